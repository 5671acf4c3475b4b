"""stanvid: STAN (CVPR 2023) and its baselines on CLIP, for video retrieval and recognition.

The public names below are imported on first use, so `import stanvid` stays cheap for the CLI and
for data-loader workers; each name lives in exactly one module, listed here.
"""

from importlib import import_module

from stanvid.errors import CheckpointError as CheckpointError
from stanvid.errors import ConfigError as ConfigError
from stanvid.errors import DatasetError as DatasetError
from stanvid.errors import StanvidError as StanvidError
from stanvid.errors import VideoReadError as VideoReadError

__version__ = "0.1.0"

_EXPORTS = {
    # tokenizer.py
    "tokenize": "stanvid.tokenizer",
    "SimpleTokenizer": "stanvid.tokenizer",
    "is_empty_caption": "stanvid.tokenizer",
    # config.py
    "VisionConfig": "stanvid.config",
    "TextConfig": "stanvid.config",
    "CLIPConfig": "stanvid.config",
    "STANConfig": "stanvid.config",
    "SeqTransfConfig": "stanvid.config",
    "ModelConfig": "stanvid.config",
    "PreprocessConfig": "stanvid.config",
    # model.py
    "VideoCLIP": "stanvid.model",
    # hub.py
    "load_model": "stanvid.hub",
    "create_model": "stanvid.hub",
    "convert_checkpoint": "stanvid.hub",
    "detect_format": "stanvid.hub",
    "push_to_hub": "stanvid.publish",
    # video_io.py
    "probe": "stanvid.video_io",
    "read_frames": "stanvid.video_io",
    "VideoInfo": "stanvid.video_io",
    "prepare_videos": "stanvid.prepare",
    # sampling.py
    "uniform_indices": "stanvid.sampling",
    "dense_indices": "stanvid.sampling",
    # metrics.py
    "retrieval_metrics": "stanvid.metrics",
    "topk_accuracy": "stanvid.metrics",
    "retrieval_metrics_from_features": "stanvid.metrics",
    "dual_softmax": "stanvid.metrics",
    "chunked_similarity": "stanvid.metrics",
    "average_views": "stanvid.metrics",
    "format_table": "stanvid.metrics",
    # losses.py
    "contrastive_loss": "stanvid.losses",
    "all_gather_with_grad": "stanvid.losses",
    "text_classifier_logits": "stanvid.losses",
    "recognition_loss": "stanvid.losses",
    # mug.py
    "mug_similarity": "stanvid.mug",
    "MUG_MODES": "stanvid.mug",
    "mug_contrastive_loss": "stanvid.losses",
    # recipe.py
    "Recipe": "stanvid.recipe",
    "load_recipe": "stanvid.recipe",
    # data/
    "RetrievalDataset": "stanvid.data",
    "RecognitionDataset": "stanvid.data",
    "make_loader": "stanvid.data",
    "load_retrieval": "stanvid.data",
    # train.py / evaluate.py
    "fit": "stanvid.train",
    "TrainResult": "stanvid.train",
    "evaluate_retrieval": "stanvid.evaluate",
    "evaluate_recognition": "stanvid.evaluate",
    "zero_shot_model": "stanvid.evaluate",
    # index.py / server.py
    "build_index": "stanvid.index",
    "open_index": "stanvid.index",
    "search_index": "stanvid.index",
    "VideoIndex": "stanvid.index",
    "SearchResult": "stanvid.index",
    "create_app": "stanvid.server",
    # query.py / zeroshot.py / embed.py
    "Query": "stanvid.query",
    "classify": "stanvid.zeroshot",
    "embed_videos": "stanvid.embed",
    # demo/
    "run_demo": "stanvid.demo.run",
    "DemoConfig": "stanvid.demo.run",
    # transforms.py
    "EvalTransform": "stanvid.transforms",
    "TrainTransform": "stanvid.transforms",
}

__all__ = sorted(
    [*_EXPORTS, "CheckpointError", "ConfigError", "DatasetError", "StanvidError", "VideoReadError"]
)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stanvid' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value

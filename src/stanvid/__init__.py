"""stanvid: STAN (CVPR 2023) and its baselines on CLIP, for video retrieval and recognition.

The public names below are imported on first use, so `import stanvid` stays cheap for the CLI and
for data-loader workers; each name lives in exactly one module, listed here.
"""

# ruff: noqa: F401 -- the TYPE_CHECKING imports are the lazy exports (ruff cannot read the computed __all__)
from importlib import import_module
from typing import TYPE_CHECKING

from stanvid.errors import CheckpointError as CheckpointError
from stanvid.errors import ClassifyError as ClassifyError
from stanvid.errors import ConfigError as ConfigError
from stanvid.errors import DatasetError as DatasetError
from stanvid.errors import EmbedError as EmbedError
from stanvid.errors import IndexedFileError as IndexedFileError
from stanvid.errors import LockHeldError as LockHeldError
from stanvid.errors import QueryError as QueryError
from stanvid.errors import StanvidError as StanvidError
from stanvid.errors import VideoIndexError as VideoIndexError
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
    # pretrained.py
    "save_pretrained": "stanvid.pretrained",
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
    # runs.py: a recipe's run, end to end
    "train_run": "stanvid.runs",
    "evaluate_run": "stanvid.runs",
    "build_dataset": "stanvid.runs",
    "load_trained": "stanvid.runs",
    "evaluate_retrieval": "stanvid.evaluate",
    "evaluate_recognition": "stanvid.evaluate",
    "zero_shot_model": "stanvid.evaluate",
    # index/ / server.py
    "build_index": "stanvid.index",
    "open_index": "stanvid.index",
    "search_index": "stanvid.index",
    "VideoIndex": "stanvid.index",
    "SearchResult": "stanvid.index",
    "IndexReport": "stanvid.index",
    "create_app": "stanvid.server",
    # query.py / zeroshot.py / embed.py
    "Query": "stanvid.query",
    "search": "stanvid.query",
    "classify": "stanvid.zeroshot",
    "embed_videos": "stanvid.embed",
    # demo/
    "run_demo": "stanvid.demo.run",
    "DemoConfig": "stanvid.demo.run",
    # transforms.py
    "EvalTransform": "stanvid.transforms",
    "TrainTransform": "stanvid.transforms",
}

_ERRORS = [
    "CheckpointError",
    "ClassifyError",
    "ConfigError",
    "DatasetError",
    "EmbedError",
    "IndexedFileError",
    "LockHeldError",
    "QueryError",
    "StanvidError",
    "VideoIndexError",
    "VideoReadError",
]
__all__ = sorted([*_EXPORTS, *_ERRORS])

if TYPE_CHECKING:  # what editors and type checkers see; at run time `__getattr__` imports on first use
    from stanvid.config import (
        CLIPConfig,
        ModelConfig,
        PreprocessConfig,
        SeqTransfConfig,
        STANConfig,
        TextConfig,
        VisionConfig,
    )
    from stanvid.data import RecognitionDataset, RetrievalDataset, load_retrieval, make_loader
    from stanvid.demo.run import DemoConfig, run_demo
    from stanvid.embed import embed_videos
    from stanvid.evaluate import evaluate_recognition, evaluate_retrieval, zero_shot_model
    from stanvid.hub import convert_checkpoint, create_model, detect_format, load_model
    from stanvid.index import IndexReport, SearchResult, VideoIndex, build_index, open_index, search_index
    from stanvid.losses import (
        all_gather_with_grad,
        contrastive_loss,
        mug_contrastive_loss,
        recognition_loss,
        text_classifier_logits,
    )
    from stanvid.metrics import (
        average_views,
        chunked_similarity,
        dual_softmax,
        format_table,
        retrieval_metrics,
        retrieval_metrics_from_features,
        topk_accuracy,
    )
    from stanvid.model import VideoCLIP
    from stanvid.mug import MUG_MODES, mug_similarity
    from stanvid.prepare import prepare_videos
    from stanvid.pretrained import save_pretrained
    from stanvid.publish import push_to_hub
    from stanvid.query import Query, search
    from stanvid.recipe import Recipe, load_recipe
    from stanvid.runs import build_dataset, evaluate_run, load_trained, train_run
    from stanvid.sampling import dense_indices, uniform_indices
    from stanvid.server import create_app
    from stanvid.tokenizer import SimpleTokenizer, is_empty_caption, tokenize
    from stanvid.train import TrainResult, fit
    from stanvid.transforms import EvalTransform, TrainTransform
    from stanvid.video_io import VideoInfo, probe, read_frames
    from stanvid.zeroshot import classify


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stanvid' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value

"""stanvid: STAN (CVPR 2023) and its baselines on CLIP, for video retrieval and recognition.

This namespace is the public API: everything the README, the docs and the benchmarks use is importable from
here (`stanvid.load_model`, `stanvid.Trainer`, `stanvid.build_index`, ...), while the module paths below it
may change between 0.x releases. The names are imported on first use, so `import stanvid` stays cheap for the
CLI and for data-loader workers; each lives in exactly one module, listed here by layer (bottom first):

    errors, fileio, locking, distributed, precision   what every layer uses
    video/        decoding, samplers, transforms, prepare-videos, folder walk, decode pipeline
    models/       config dataclasses, CLIP, STAN, baselines, the Mug head, VideoCLIP, tokenizer, heads
    checkpoints/  format detection, key maps, load_model, open_clip names, hub download and upload
    data/         datasets and loaders
    training/     recipes, the loop, trainer, losses, evaluation, metrics, runs, publishing
    search/       the index, queries, the Mug re-rank, embed, classify, server and web page
    demo/, cli/   `stanvid demo` and the commands

A part imports only the parts above it in this list (tests/test_layout.py holds the table). `stanvid.search`
is the search layer's package, so a query goes through `stanvid.search_index` (an index path and a text) or
an open index's `VideoIndex.search` (text) and `VideoIndex.query` (a `stanvid.Query`, `group_by`).
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
from stanvid.errors import NonFiniteLossError as NonFiniteLossError
from stanvid.errors import QueryError as QueryError
from stanvid.errors import StanvidError as StanvidError
from stanvid.errors import VideoIndexError as VideoIndexError
from stanvid.errors import VideoReadError as VideoReadError

__version__ = "0.1.0"

_EXPORTS = {
    # shared: precision of inference
    "resolve_precision": "stanvid.precision",
    "prepare_for_inference": "stanvid.precision",
    "quantize_int8": "stanvid.precision",
    # video: decoding, sampling, transforms, prepare-videos
    "probe": "stanvid.video.decode",
    "read_frames": "stanvid.video.decode",
    "VideoInfo": "stanvid.video.decode",
    "clear_frame_index_cache": "stanvid.video.decode",
    "MemoryVideo": "stanvid.video.decode",
    "DecodedVideo": "stanvid.video.held",
    "FRAME_FOLDER_FPS": "stanvid.video.frames",
    "IMAGE_EXTENSIONS": "stanvid.video.frames",
    "VIDEO_EXTENSIONS": "stanvid.video.decode",
    "uniform_indices": "stanvid.video.sampling",
    "dense_indices": "stanvid.video.sampling",
    "EvalTransform": "stanvid.video.transforms",
    "TrainTransform": "stanvid.video.transforms",
    "MultiCropTransform": "stanvid.video.transforms",
    "normalize": "stanvid.video.transforms",
    "center_crop": "stanvid.video.transforms",
    "resize_short_side": "stanvid.video.transforms",
    "CLIP_MEAN": "stanvid.video.transforms",
    "CLIP_STD": "stanvid.video.transforms",
    "prepare_videos": "stanvid.video.prepare",
    "find_videos": "stanvid.video.folders",
    "walk_videos": "stanvid.video.folders",
    "encode_batch_size": "stanvid.video.pipeline",
    # models: configs, the video model, the tokenizer, the Mug head
    "VisionConfig": "stanvid.models.config",
    "TextConfig": "stanvid.models.config",
    "CLIPConfig": "stanvid.models.config",
    "STANConfig": "stanvid.models.config",
    "SeqTransfConfig": "stanvid.models.config",
    "ModelConfig": "stanvid.models.config",
    "PreprocessConfig": "stanvid.models.config",
    "TokenizerConfig": "stanvid.models.config",
    "MUG_MODES": "stanvid.models.config",
    "VideoCLIP": "stanvid.models.video_clip",
    "tokenize": "stanvid.models.tokenizer",
    "SimpleTokenizer": "stanvid.models.tokenizer",
    "is_empty_caption": "stanvid.models.tokenizer",
    "default_tokenizer": "stanvid.models.tokenizer",
    "mug_similarity": "stanvid.models.mug",
    "mug_block_size": "stanvid.models.mug",
    "LinearHead": "stanvid.models.heads",
    "encode_class_names": "stanvid.models.heads",
    "save_pretrained": "stanvid.models.pretrained",
    # checkpoints: every format in, the hub both ways
    "load_model": "stanvid.checkpoints.load",
    "create_model": "stanvid.checkpoints.load",
    "convert_checkpoint": "stanvid.checkpoints.load",
    "detect_format": "stanvid.checkpoints.load",
    "export_onnx": "stanvid.checkpoints.load",
    "OnnxEncoder": "stanvid.checkpoints.onnx_runtime",
    # data: datasets and loaders
    "RetrievalDataset": "stanvid.data",
    "RecognitionDataset": "stanvid.data",
    "make_loader": "stanvid.data",
    "worker_context": "stanvid.data",
    "load_retrieval": "stanvid.data",
    "load_video_captions": "stanvid.data",
    "ShardDataset": "stanvid.data",
    "SampleReader": "stanvid.data",
    "SampleFields": "stanvid.data",
    "ShardLoader": "stanvid.data",
    "ShardList": "stanvid.data",
    "load_shards": "stanvid.data",
    "write_shards": "stanvid.data",
    # training: recipes, the loop, losses, evaluation, metrics
    "Recipe": "stanvid.training.recipe",
    "load_recipe": "stanvid.training.recipe",
    "fit": "stanvid.training.loop",
    "TrainResult": "stanvid.training.loop",
    "Trainer": "stanvid.training.trainer",
    "train_run": "stanvid.training.runs",
    "evaluate_run": "stanvid.training.runs",
    "build_dataset": "stanvid.training.runs",
    "load_trained": "stanvid.training.runs",
    "evaluate_retrieval": "stanvid.training.evaluate",
    "evaluate_recognition": "stanvid.training.evaluate",
    "zero_shot_model": "stanvid.training.evaluate",
    "mug_scores": "stanvid.training.evaluate",
    "contrastive_loss": "stanvid.training.losses",
    "sigmoid_loss": "stanvid.training.losses",
    "all_gather_with_grad": "stanvid.training.losses",
    "text_classifier_logits": "stanvid.training.losses",
    "recognition_loss": "stanvid.training.losses",
    "mug_contrastive_loss": "stanvid.training.losses",
    "retrieval_metrics": "stanvid.training.metrics",
    "topk_accuracy": "stanvid.training.metrics",
    "retrieval_metrics_from_features": "stanvid.training.metrics",
    "dual_softmax": "stanvid.training.metrics",
    "chunked_similarity": "stanvid.training.metrics",
    "average_views": "stanvid.training.metrics",
    "format_table": "stanvid.training.metrics",
    "push_to_hub": "stanvid.training.publish",
    # search: the index, queries, embed, classify, the server
    "build_index": "stanvid.search.index",
    "open_index": "stanvid.search.index",
    "search_index": "stanvid.search.index",
    "VideoIndex": "stanvid.search.index",
    "SearchResult": "stanvid.search.index",
    "IndexReport": "stanvid.search.index",
    "make_vector_index": "stanvid.search.index",
    "model_fingerprint": "stanvid.search.index",
    "segment_bounds": "stanvid.search.index",
    "segment_frame_indices": "stanvid.search.index",
    "Query": "stanvid.search.query",
    "FileHit": "stanvid.search.query",
    "ClipSpec": "stanvid.search.query",
    "Moment": "stanvid.search.moments",
    "file_moments": "stanvid.search.moments",
    "export_moment": "stanvid.search.moment_export",
    "ExportedMoment": "stanvid.search.moment_export",
    "evaluate_moments": "stanvid.search.moment_eval",
    "moment_metrics": "stanvid.search.moment_eval",
    "temporal_iou": "stanvid.search.moment_eval",
    "SearchFilter": "stanvid.search.index.filters",
    "CopyGroup": "stanvid.search.duplicates",
    "CopyMatch": "stanvid.search.duplicates",
    "find_duplicates": "stanvid.search.duplicates",
    "frames_blob": "stanvid.search.rerank",
    "blob_frames": "stanvid.search.rerank",
    "classify": "stanvid.search.classify",
    "embed_videos": "stanvid.search.embed",
    "create_app": "stanvid.search.server.app",
    # demo
    "run_demo": "stanvid.demo.run",
    "DemoConfig": "stanvid.demo.run",
    "demo_model_config": "stanvid.demo.run",
}

_ERRORS = [
    "CheckpointError",
    "ClassifyError",
    "ConfigError",
    "DatasetError",
    "EmbedError",
    "IndexedFileError",
    "LockHeldError",
    "NonFiniteLossError",
    "QueryError",
    "StanvidError",
    "VideoIndexError",
    "VideoReadError",
]
__all__ = sorted([*_EXPORTS, *_ERRORS])

if TYPE_CHECKING:  # what editors and type checkers see; at run time `__getattr__` imports on first use
    from stanvid.checkpoints.load import (
        convert_checkpoint,
        create_model,
        detect_format,
        export_onnx,
        load_model,
    )
    from stanvid.checkpoints.onnx_runtime import OnnxEncoder
    from stanvid.data import (
        RecognitionDataset,
        RetrievalDataset,
        SampleFields,
        SampleReader,
        ShardDataset,
        ShardList,
        ShardLoader,
        load_retrieval,
        load_shards,
        load_video_captions,
        make_loader,
        worker_context,
        write_shards,
    )
    from stanvid.demo.run import DemoConfig, demo_model_config, run_demo
    from stanvid.models.config import (
        MUG_MODES,
        CLIPConfig,
        ModelConfig,
        PreprocessConfig,
        SeqTransfConfig,
        STANConfig,
        TextConfig,
        TokenizerConfig,
        VisionConfig,
    )
    from stanvid.models.heads import LinearHead, encode_class_names
    from stanvid.models.mug import mug_block_size, mug_similarity
    from stanvid.models.pretrained import save_pretrained
    from stanvid.models.tokenizer import SimpleTokenizer, default_tokenizer, is_empty_caption, tokenize
    from stanvid.models.video_clip import VideoCLIP
    from stanvid.precision import prepare_for_inference, quantize_int8, resolve_precision
    from stanvid.search.classify import classify
    from stanvid.search.duplicates import CopyGroup, CopyMatch, find_duplicates
    from stanvid.search.embed import embed_videos
    from stanvid.search.index import (
        IndexReport,
        SearchResult,
        VideoIndex,
        build_index,
        make_vector_index,
        model_fingerprint,
        open_index,
        search_index,
        segment_bounds,
        segment_frame_indices,
    )
    from stanvid.search.index.filters import SearchFilter
    from stanvid.search.moment_eval import evaluate_moments, moment_metrics, temporal_iou
    from stanvid.search.moment_export import ExportedMoment, export_moment
    from stanvid.search.moments import Moment, file_moments
    from stanvid.search.query import ClipSpec, FileHit, Query
    from stanvid.search.rerank import blob_frames, frames_blob
    from stanvid.search.server.app import create_app
    from stanvid.training.evaluate import (
        evaluate_recognition,
        evaluate_retrieval,
        mug_scores,
        zero_shot_model,
    )
    from stanvid.training.loop import TrainResult, fit
    from stanvid.training.losses import (
        all_gather_with_grad,
        contrastive_loss,
        mug_contrastive_loss,
        recognition_loss,
        sigmoid_loss,
        text_classifier_logits,
    )
    from stanvid.training.metrics import (
        average_views,
        chunked_similarity,
        dual_softmax,
        format_table,
        retrieval_metrics,
        retrieval_metrics_from_features,
        topk_accuracy,
    )
    from stanvid.training.publish import push_to_hub
    from stanvid.training.recipe import Recipe, load_recipe
    from stanvid.training.runs import build_dataset, evaluate_run, load_trained, train_run
    from stanvid.training.trainer import Trainer
    from stanvid.video.decode import (
        VIDEO_EXTENSIONS,
        MemoryVideo,
        VideoInfo,
        clear_frame_index_cache,
        probe,
        read_frames,
    )
    from stanvid.video.folders import find_videos, walk_videos
    from stanvid.video.frames import FRAME_FOLDER_FPS, IMAGE_EXTENSIONS
    from stanvid.video.held import DecodedVideo
    from stanvid.video.pipeline import encode_batch_size
    from stanvid.video.prepare import prepare_videos
    from stanvid.video.sampling import dense_indices, uniform_indices
    from stanvid.video.transforms import (
        CLIP_MEAN,
        CLIP_STD,
        EvalTransform,
        MultiCropTransform,
        TrainTransform,
        center_crop,
        normalize,
        resize_short_side,
    )


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stanvid' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value

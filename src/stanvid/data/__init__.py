"""Datasets and loaders: retrieval (MSR-VTT, DiDeMo, MSVD, LSMDC, ActivityNet, WebVid, your own captions) and
recognition (Kinetics, Something-Something v2), read from the annotation files each benchmark ships; the names
of these formats and their readers are one table, `stanvid.data.datasets.DATASETS`.

    from stanvid.data import load_retrieval, RetrievalDataset, make_loader

    ann = load_retrieval("msrvtt", "test-1k", "data/msrvtt", "data/msrvtt/videos")
    ds = RetrievalDataset(ann, num_frames=12, unit="video")
    loader = make_loader(ds, batch_size=16, num_workers=8)

May import: the shared top modules, `stanvid.video` (decoding, samplers, transforms) and `stanvid.models`
(the tokenizer that turns captions into ids). Never training, search, the demo or the CLI.
"""

from stanvid.data.base import (
    VIDEO_EXTENSIONS,
    SkippedSample,
    VideoClipDataset,
    VideoFinder,
    collate_skipping,
    format_skipped,
)
from stanvid.data.datasets import DATASET_NAMES, RETRIEVAL_DATASETS, load_retrieval
from stanvid.data.loader import VideoLoader, make_loader, seed_worker, worker_context
from stanvid.data.recognition import (
    RecognitionAnnotations,
    RecognitionDataset,
    load_kinetics,
    load_ssv2,
    read_class_names,
)
from stanvid.data.retrieval import RetrievalAnnotations, RetrievalDataset
from stanvid.data.retrieval_formats import (
    load_activitynet,
    load_caption_json,
    load_didemo,
    load_lsmdc,
    load_msrvtt,
    load_msrvtt_test,
    load_msvd,
    load_video_captions,
    load_webvid,
)
from stanvid.data.shard_dataset import (
    SampleFields,
    SampleReader,
    ShardDataset,
    ShardLoader,
    ShardMembers,
    load_shard_annotations,
)
from stanvid.data.shard_writer import ShardReport, write_shards
from stanvid.data.shards import ShardList, expand_shards, load_shards

__all__ = [
    "VIDEO_EXTENSIONS",
    "DATASET_NAMES",
    "RETRIEVAL_DATASETS",
    "SkippedSample",
    "VideoClipDataset",
    "VideoFinder",
    "collate_skipping",
    "format_skipped",
    "VideoLoader",
    "make_loader",
    "worker_context",
    "seed_worker",
    "RecognitionAnnotations",
    "RecognitionDataset",
    "load_kinetics",
    "load_ssv2",
    "read_class_names",
    "RetrievalAnnotations",
    "RetrievalDataset",
    "load_activitynet",
    "load_caption_json",
    "load_didemo",
    "load_lsmdc",
    "load_msrvtt",
    "load_msrvtt_test",
    "load_msvd",
    "load_retrieval",
    "load_video_captions",
    "load_webvid",
    "SampleFields",
    "SampleReader",
    "ShardDataset",
    "ShardLoader",
    "ShardMembers",
    "load_shard_annotations",
    "ShardReport",
    "write_shards",
    "ShardList",
    "expand_shards",
    "load_shards",
]

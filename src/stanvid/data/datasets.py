"""The dataset names stanvid knows, in one table: the task each serves and the reader of its annotation files.

Two callers read datasets by name, and both look them up here, so a name means the same format everywhere:

* a recipe (``data.dataset``): one split is an annotation file plus the side files the recipe names
  (`SplitFiles`), read by the entry's ``read`` (`read_split`); recipe validation takes its choices and the
  dataset-task check from this table (`DATASET_NAMES`, `dataset_task`);
* `load_retrieval`: a retrieval split by name (``test-1k``) from a folder laid out as CLIP4Clip's, read by the
  entry's ``folder`` reader.

=================  ==========  ================================================================================
name               task        files (a recipe's split: ``data.train_annotations`` / ``data.test_annotations``)
=================  ==========  ================================================================================
``msrvtt``         retrieval   ``.json`` caption file (the official STAN ``train_9k.json`` /
                               ``test_JSFUSION.json``, or an mmaction2 list); ``.csv`` with ``data.captions`` =
                               ``MSRVTT_data.json`` (CLIP4Clip train split), or a ``.csv`` alone =
                               ``MSRVTT_JSFUSION_test.csv``
``didemo``         retrieval   DiDeMo json (original list or ``{video: [sentences]}``), sentences joined
``msvd``           retrieval   split list (``train_list.txt``) with ``data.captions`` (``raw-captions.pkl``,
                               txt or json)
``lsmdc``          retrieval   ``.json`` caption file, or the ``LSMDC16_annos_*.csv`` tab-separated files
``activitynet``    retrieval   ActivityNet Captions json (``train.json`` / ``val_1.json``), paragraph
``webvid``         retrieval   train: the WebVid csv (or the Mug-STAN json dict); test: another dataset's
                               ``.json`` caption file (Mug-STAN post-pretraining validates on MSR-VTT)
``captions``       either      your own data: retrieval, a csv/tsv/jsonl/json of ``video, caption``;
                               recognition, a Kinetics csv or ``path label`` list with ``data.class_names``
``kinetics400``    recognition ``path label`` list or the official csv, with ``data.class_names``
``ssv2``           recognition ``train.json`` / ``validation.json`` with ``data.class_names`` = ``labels.json``
``webdataset``     either      tar shards: a brace pattern relative to ``data.root`` (``shards/{00000..00999}.tar``),
                               a list of them, or a shard index ``.json`` (`stanvid.data.shard_dataset`); caption
                               in ``.txt`` or ``.json[data.caption_key]``, label in ``.cls`` or
                               ``.json[data.label_key]``, classes from ``data.class_names``
=================  ==========  ================================================================================

``csv`` is an alias of ``captions`` (the name recipes used before the two readers shared this table); a recipe
keeps the name it was written with, so checkpoints written under either name still resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stanvid.data.recognition import RecognitionAnnotations, load_kinetics, load_ssv2, read_class_names
from stanvid.data.retrieval import RetrievalAnnotations
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
from stanvid.data.shard_dataset import SampleFields, load_shard_annotations
from stanvid.data.shards import load_shards
from stanvid.errors import ConfigError, DatasetError

__all__ = [
    "DATASETS",
    "ALIASES",
    "DATASET_NAMES",
    "RETRIEVAL_DATASETS",
    "DatasetFormat",
    "SplitFiles",
    "dataset_format",
    "dataset_task",
    "read_split",
    "load_retrieval",
]

PathLike = str | os.PathLike
Annotations = RetrievalAnnotations | RecognitionAnnotations


@dataclass(frozen=True)
class SplitFiles:
    """One split of a recipe, its paths resolved: what a `DatasetFormat.read` gets.

    ``dataset`` is the name as the recipe spells it (an alias stays an alias), so messages quote the user's
    own word; ``captions`` and ``class_names`` are the recipe's side files (None when it names none).
    """

    dataset: str
    split: str  # "train" or "test"
    task: str  # the recipe's task: "captions" reads captions for retrieval, labels for recognition
    annotations: Path
    videos: Path
    captions: Path | None = None
    class_names: Path | None = None
    shards: tuple[str, ...] = ()  # webdataset: the split's patterns (or shard index), relative to `videos`
    caption_key: str | None = None  # webdataset: where a sample's caption and label are
    label_key: str | None = None
    allow_pipe: bool = False  # webdataset: run a shard index's pipe: URLs (data.allow_pipe_urls)
    max_sample_mb: int = 128  # webdataset: the most one sample's members may hold (data.max_sample_mb)

    def require(self, key: str) -> Path:
        """The side file ``key`` (``captions`` / ``class_names``), or a `ConfigError` naming ``data.<key>``."""
        value = getattr(self, key)
        if value is None:
            raise ConfigError(
                f"data.{key} is required for data.dataset {self.dataset!r} ({self.annotations.name})"
            )
        return value

    @property
    def is_json(self) -> bool:
        return self.annotations.suffix.lower() == ".json"


# by split name from a folder laid out as CLIP4Clip's: (split, folder or file, video root, on_missing)
FolderReader = Callable[[str, Path, PathLike, str], RetrievalAnnotations]


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset name: the ``task`` it serves (None: either), ``read`` for a recipe's split, and ``folder``
    for `load_retrieval` (None: not a retrieval dataset there)."""

    task: str | None
    read: Callable[[SplitFiles], Annotations]
    folder: FolderReader | None = None


# ---- a recipe's split --------------------------------------------------------------------------------------


def _read_msrvtt(f: SplitFiles) -> RetrievalAnnotations:
    if f.is_json:
        return load_caption_json(f.annotations, f.videos)
    if f.captions is not None:
        return load_msrvtt(f.annotations, f.captions, f.videos)
    return load_msrvtt_test(f.annotations, f.videos)


def _read_lsmdc(f: SplitFiles) -> RetrievalAnnotations:
    return load_caption_json(f.annotations, f.videos) if f.is_json else load_lsmdc(f.annotations, f.videos)


def _read_webvid(f: SplitFiles) -> RetrievalAnnotations:
    # post-pretraining: WebVid to train on, another dataset's json (MSR-VTT) to validate on
    if f.split == "train":
        return load_webvid(f.annotations, f.videos)
    return load_caption_json(f.annotations, f.videos)


def _read_captions(f: SplitFiles) -> Annotations:
    if f.task == "retrieval":
        return load_video_captions(f.annotations, f.videos)
    return _read_kinetics(f)


def _read_kinetics(f: SplitFiles) -> RecognitionAnnotations:
    return load_kinetics(f.annotations, f.videos, f.require("class_names"))


def _read_webdataset(f: SplitFiles) -> Annotations:
    # a split of local shards, map-style (evaluation, dry run); training streams them (ShardDataset)
    classes = read_class_names(f.class_names) if f.class_names is not None else None
    fields = SampleFields(f.task, f.caption_key, f.label_key, classes)
    shards = load_shards(list(f.shards), f.videos, allow_pipe=f.allow_pipe)
    return load_shard_annotations(shards, fields, max_bytes=f.max_sample_mb << 20)


# ---- a retrieval split by name, from a CLIP4Clip folder ----------------------------------------------------

_LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
_ACTIVITYNET_FILES = {"train": ("train.json", "train_ids.json"), "val": ("val_1.json", "val_ids.json")}
_MSRVTT_SPLITS = {"train-9k": "MSRVTT_train.9k.csv", "train-7k": "MSRVTT_train.7k.csv"}
_PLAIN_SPLITS = ("train", "val", "test")


def _check_split(dataset: str, split: str, choices: Sequence[str]) -> None:
    if split not in choices:
        raise ConfigError(f"unknown {dataset} split {split!r}; choose from {tuple(choices)}")


def _folder(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"annotation folder {root} does not exist")
    return root


def _msrvtt_folder(split: str, root: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    if root.is_file():  # a json caption file (STAN / mmaction2), whatever the split
        return load_caption_json(root, videos, on_missing=on_missing)
    root = _folder(root)
    if split == "test-1k":
        return load_msrvtt_test(root / "MSRVTT_JSFUSION_test.csv", videos, on_missing)
    _check_split("msrvtt", split, [*_MSRVTT_SPLITS, "test-1k"])
    return load_msrvtt(root / _MSRVTT_SPLITS[split], root / "MSRVTT_data.json", videos, on_missing)


def _didemo_folder(split: str, root: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    if root.is_file():
        return load_caption_json(root, videos, paragraph=True, on_missing=on_missing)
    root = _folder(root)
    _check_split("didemo", split, _PLAIN_SPLITS)
    listing = root / f"{split}_list.txt"
    return load_didemo(
        root / f"{split}_data.json", videos, listing if listing.is_file() else None, on_missing=on_missing
    )


def _msvd_folder(split: str, root: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    root = _folder(root)
    _check_split("msvd", split, _PLAIN_SPLITS)
    for name in ("raw-captions.pkl", "AllVideoDescriptions.txt", "captions.json"):
        if (root / name).is_file():
            return load_msvd(root / f"{split}_list.txt", root / name, videos, on_missing)
    raise DatasetError(
        f"{root}: no MSVD captions (raw-captions.pkl, AllVideoDescriptions.txt or captions.json)"
    )


def _lsmdc_folder(split: str, root: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    root = _folder(root)
    _check_split("lsmdc", split, _LSMDC_FILES)
    return load_lsmdc(root / _LSMDC_FILES[split], videos, on_missing)


def _activitynet_folder(split: str, root: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    root = _folder(root)
    _check_split("activitynet", split, _ACTIVITYNET_FILES)
    data_name, ids_name = _ACTIVITYNET_FILES[split]
    ids = root / ids_name
    return load_activitynet(root / data_name, videos, ids if ids.is_file() else None, on_missing=on_missing)


def _captions_file(split: str, path: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    return load_video_captions(path, videos, on_missing)


def _shards_folder(split: str, path: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    # `annotations` names the shards (a pattern or a shard index), relative to `video_root`
    return load_shard_annotations(load_shards(str(path), videos), SampleFields("retrieval"))


def _webvid_file(split: str, path: Path, videos: PathLike, on_missing: str) -> RetrievalAnnotations:
    return load_webvid(path, videos, on_missing)


# ---- the table ---------------------------------------------------------------------------------------------

DATASETS: dict[str, DatasetFormat] = {
    "msrvtt": DatasetFormat("retrieval", _read_msrvtt, _msrvtt_folder),
    "didemo": DatasetFormat("retrieval", lambda f: load_didemo(f.annotations, f.videos), _didemo_folder),
    "msvd": DatasetFormat(
        "retrieval", lambda f: load_msvd(f.annotations, f.require("captions"), f.videos), _msvd_folder
    ),
    "lsmdc": DatasetFormat("retrieval", _read_lsmdc, _lsmdc_folder),
    "activitynet": DatasetFormat(
        "retrieval", lambda f: load_activitynet(f.annotations, f.videos), _activitynet_folder
    ),
    "webvid": DatasetFormat("retrieval", _read_webvid, _webvid_file),
    "captions": DatasetFormat(None, _read_captions, _captions_file),
    "kinetics400": DatasetFormat("recognition", _read_kinetics),
    "ssv2": DatasetFormat(
        "recognition", lambda f: load_ssv2(f.annotations, f.require("class_names"), f.videos)
    ),
    "webdataset": DatasetFormat(None, _read_webdataset, _shards_folder),
}
ALIASES = {"csv": "captions"}  # older name -> table name
DATASET_NAMES = (*DATASETS, *ALIASES)  # every name a recipe may use
RETRIEVAL_DATASETS = tuple(name for name, entry in DATASETS.items() if entry.folder is not None)


def dataset_format(name: str) -> DatasetFormat:
    """The table entry of ``name`` (an alias resolves to its entry); `ConfigError` listing the names."""
    entry = DATASETS.get(ALIASES.get(name, name))
    if entry is None:
        raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    return entry


def dataset_task(name: str) -> str | None:
    """The task dataset ``name`` serves: ``retrieval``, ``recognition``, or None for either."""
    return dataset_format(name).task


def read_split(files: SplitFiles) -> Annotations:
    """The annotations of one recipe split, read as its dataset's table entry says."""
    return dataset_format(files.dataset).read(files)


def load_retrieval(
    dataset: str, split: str, annotations: PathLike, video_root: PathLike, on_missing: str = "raise"
) -> RetrievalAnnotations:
    """Annotations of ``dataset``/``split`` from a folder laid out as CLIP4Clip's (or one caption file).

    ==============  =======================================  ==============================================
    dataset         split                                    files read under ``annotations``
    ==============  =======================================  ==============================================
    ``msrvtt``      ``train-9k``, ``train-7k``, ``test-1k``  ``MSRVTT_train.*.csv`` + ``MSRVTT_data.json``;
                                                             ``MSRVTT_JSFUSION_test.csv``
    ``didemo``      ``train``, ``val``, ``test``             ``{split}_data.json`` [+ ``{split}_list.txt``]
    ``msvd``        ``train``, ``val``, ``test``             ``{split}_list.txt`` + ``raw-captions.pkl`` |
                                                             ``AllVideoDescriptions.txt`` | ``captions.json``
    ``lsmdc``       ``train``, ``val``, ``test``             ``LSMDC16_annos_*.csv``, challenge test csv
    ``activitynet`` ``train``, ``val``                       ``train.json`` / ``val_1.json`` [+ ids json]
    ``webvid``      (any)                                    ``annotations`` is the WebVid csv (or json)
    ``captions``    (any)                                    ``annotations`` is the csv/jsonl/json file
    ``webdataset``  (any)                                    ``annotations`` names local shards (a pattern,
                                                             or a shard index), relative to ``video_root``
    ==============  =======================================  ==============================================

    For ``msrvtt`` and ``didemo``, ``annotations`` may also be a json caption file (STAN/mmaction2 format).
    ``csv`` is accepted for ``captions``, as in recipes.
    """
    entry = DATASETS.get(ALIASES.get(dataset, dataset))
    if entry is None or entry.folder is None:
        raise ConfigError(f"unknown retrieval dataset {dataset!r}; choose from {RETRIEVAL_DATASETS}")
    return entry.folder(split, Path(annotations), video_root, on_missing)

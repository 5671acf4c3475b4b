"""Readers for the retrieval annotation files users actually have, each returning ``RetrievalAnnotations``.

Layouts follow CLIP4Clip's dataloaders (ArrowLuo/CLIP4Clip, ``dataloaders/dataloader_*_retrieval.py``)
and the official STAN/mmaction2 json files:

=============  ==========================================================================================
MSR-VTT        ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (column ``video_id``) with the captions of
               ``MSRVTT_data.json`` (``sentences``: ``video_id``, ``caption``), every caption a sample;
               ``MSRVTT_JSFUSION_test.csv`` (``key, vid_key, video_id, sentence``), the 1k-A test;
               mmaction2 json lists ``[{"video": "video0.mp4", "caption": str | [str]}]`` and the official
               STAN json dicts ``{"video0.mp4": [str]}`` (``train_9k.json``, ``test_JSFUSION.json``).
DiDeMo         ``{split}_data.json`` (the original DiDeMo list of ``video``, ``description``, ``times``) with
               the optional ``{split}_list.txt``; or a STAN json dict. Paragraph: sentences joined.
MSVD           ``{split}_list.txt`` (one id per line) and the captions: ``raw-captions.pkl`` (read with an
               unpickler that only builds dicts, lists and strings), ``AllVideoDescriptions.txt`` (``id
               caption`` per line) or json ``{id: [str]}``. Every caption is a query.
LSMDC          ``LSMDC16_annos_*.csv``, tab-separated ``clip_id, start_aligned, end_aligned,
               start_extracted, end_extracted, sentence``; the same clip may carry several sentences.
ActivityNet    ``train.json`` / ``val_1.json`` ``{video_id: {"duration", "timestamps", "sentences"}}`` with
               the optional ``train_ids.json``; paragraph. Files may drop the ``v_`` prefix of the id.
WebVid         the released ``results_2M_train.csv`` / ``results_10M_train.csv`` (``videoid, name, page_dir``;
               the video is ``<page_dir>/<videoid>.mp4`` under the video folder, as the usual downloaders and
               Frozen-in-Time lay it out), or the official Mug-STAN json dict ``{"<dir>/<file>.mp4": caption}``.
generic        CSV with ``video`` and ``caption`` columns, JSONL / json list of ``{"video", "caption"}``.
=============  ==========================================================================================

Bad annotations raise ``DatasetError`` naming the file and the line (text files) or the entry (json): a
missing field, an empty caption, or a video id with no file under the video folder. ``on_missing="skip"``
leaves such videos out instead and lists each in ``annotations.missing`` (CLIP4Clip drops them silently).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stanvid.data.base import (
    VideoFinder,
    check_caption,
    existing_file,
    read_csv_rows,
    read_json,
    read_lines,
    require_field,
)
from stanvid.data.retrieval import RetrievalAnnotations
from stanvid.errors import ConfigError, DatasetError

__all__ = [
    "load_msrvtt",
    "load_msrvtt_test",
    "load_caption_json",
    "load_didemo",
    "load_msvd",
    "load_lsmdc",
    "load_activitynet",
    "load_video_captions",
    "load_webvid",
]

PathLike = str | os.PathLike


class _Builder:
    """Accumulates videos (resolved to files once each) and captions, checking both as they come."""

    def __init__(self, name: str, video_root: PathLike, on_missing: str) -> None:
        if on_missing not in ("raise", "skip"):
            raise ConfigError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
        self.name = name
        self.finder = VideoFinder(video_root)
        self.on_missing = on_missing
        self.index: dict[str, int] = {}
        self.absent: set[str] = set()
        self.video_ids: list[str] = []
        self.video_paths: list[str] = []
        self.captions: list[str] = []
        self.text_to_video: list[int] = []
        self.missing: list[str] = []

    def video(self, video_id: Any, where: str, alternatives: Sequence[str] = ()) -> int | None:
        """Index of ``video_id`` (added on first sight), or None when its file is missing and skipped."""
        if not isinstance(video_id, str) or not video_id.strip():
            raise DatasetError(f"{where}: video id must be a non-empty string, got {video_id!r}")
        video_id = video_id.strip()
        if video_id in self.index:
            return self.index[video_id]
        if video_id in self.absent:
            return None
        path = None
        for candidate in (video_id, *alternatives):
            path = self.finder.find(candidate)
            if path is not None:
                break
        if path is None:
            tried = ", ".join(repr(c) for c in (video_id, *alternatives))
            message = f"{where}: no video file for id {tried} under {self.finder.root}"
            if self.on_missing == "raise":
                raise DatasetError(message)
            self.absent.add(video_id)
            self.missing.append(message)
            return None
        self.index[video_id] = len(self.video_ids)
        self.video_ids.append(video_id)
        self.video_paths.append(str(path))
        return self.index[video_id]

    def caption(self, video_index: int | None, text: str) -> None:
        if video_index is not None:
            self.captions.append(text)
            self.text_to_video.append(video_index)

    def build(self, source: str) -> RetrievalAnnotations:
        if not self.captions:
            detail = (
                f" ({len(self.missing)} video(s) missing, e.g. {self.missing[0]})" if self.missing else ""
            )
            raise DatasetError(f"{source}: no captions with a video{detail}")
        return RetrievalAnnotations(
            name=self.name,
            video_ids=self.video_ids,
            video_paths=self.video_paths,
            captions=self.captions,
            text_to_video=self.text_to_video,
            missing=self.missing,
        )


def _caption_list(value: Any, where: str) -> list[str]:
    """A caption field that is one string or a list of strings, each checked."""
    if isinstance(value, str):
        return [check_caption(value, where)]
    if isinstance(value, list) and value:
        return [check_caption(text, f"{where}[{i}]") for i, text in enumerate(value)]
    raise DatasetError(f"{where}: caption must be a string or a non-empty list of strings, got {value!r}")


def _split_ids(path: PathLike | None) -> set[str] | None:
    if path is None:
        return None
    if Path(path).suffix == ".json":
        ids = read_json(path)
        if not isinstance(ids, list):
            raise DatasetError(f"{path}: expected a json list of video ids")
        return {str(i) for i in ids}
    return {line for _, line in read_lines(path)}


# --- MSR-VTT ------------------------------------------------------------------------------------------


def load_msrvtt(
    split_csv: PathLike, data_json: PathLike, video_root: PathLike, on_missing: str = "raise"
) -> RetrievalAnnotations:
    """MSR-VTT training split (CLIP4Clip layout): the videos of ``split_csv``, every caption of each."""
    split_ids: list[tuple[str, str]] = [
        (row["video_id"].strip(), where) for where, row in read_csv_rows(split_csv, ["video_id"])
    ]
    data = read_json(data_json)
    sentences = require_field(data, "sentences", str(data_json))
    if not isinstance(sentences, list):
        raise DatasetError(f"{data_json}: 'sentences' must be a list")
    by_video: dict[str, list[str]] = {}
    for i, entry in enumerate(sentences):
        where = f"{data_json}: sentences[{i}]"
        video_id = require_field(entry, "video_id", where)
        caption = check_caption(require_field(entry, "caption", where), where)
        by_video.setdefault(str(video_id), []).append(caption)
    builder = _Builder(f"msrvtt:{Path(split_csv).name}", video_root, on_missing)
    for video_id, where in split_ids:
        if video_id not in by_video:
            raise DatasetError(f"{where}: video {video_id!r} has no caption in {data_json}")
        index = builder.video(video_id, where)
        for caption in by_video[video_id]:
            builder.caption(index, caption)
    return builder.build(str(split_csv))


def load_msrvtt_test(
    test_csv: PathLike, video_root: PathLike, on_missing: str = "raise"
) -> RetrievalAnnotations:
    """MSR-VTT 1k-A test (``MSRVTT_JSFUSION_test.csv``: ``key, vid_key, video_id, sentence``)."""
    builder = _Builder(f"msrvtt:{Path(test_csv).name}", video_root, on_missing)
    for where, row in read_csv_rows(test_csv, ["video_id", "sentence"]):
        caption = check_caption(row["sentence"], where)
        builder.caption(builder.video(row["video_id"], where), caption)
    return builder.build(str(test_csv))


def load_caption_json(
    path: PathLike, video_root: PathLike, paragraph: bool = False, on_missing: str = "raise"
) -> RetrievalAnnotations:
    """A json caption file: a list ``[{"video", "caption": str | [str]}]`` or a dict ``{video: str | [str]}``.

    The list is mmaction2's video-retrieval format; the dict is what the official STAN configs read
    (``train_9k.json``, ``test_JSFUSION.json``, DiDeMo). ``paragraph=True`` joins a video's captions.
    """
    data = read_json(path)
    if isinstance(data, dict):
        entries = [(f"{path}: entry {key!r}", key, value) for key, value in data.items()]
    elif isinstance(data, list):
        entries = []
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            entries.append(
                (where, require_field(entry, "video", where), require_field(entry, "caption", where))
            )
    else:
        raise DatasetError(f"{path}: expected a json list of {{video, caption}} or a dict video -> captions")
    return _from_entries(entries, f"json:{Path(path).name}", str(path), video_root, paragraph, on_missing)


def _from_entries(
    entries: list[tuple[Any, Any, Any]],
    name: str,
    source: str,
    video_root: PathLike,
    paragraph: bool,
    on_missing: str,
    alternatives=None,
) -> RetrievalAnnotations:
    """Builds annotations from ``(where, video_id, caption field)``; a paragraph joins per video.

    ``where`` names the entry in errors; it may be a pair ``(where of the video id, where of the caption)``
    when the two come from different files (MSVD).
    """
    builder = _Builder(name, video_root, on_missing)
    grouped: dict[int, list[str]] = {}
    order: list[int] = []
    for where, video_id, value in entries:
        video_where, caption_where = where if isinstance(where, tuple) else (where, where)
        captions = _caption_list(value, f"{caption_where}: caption")
        alts = alternatives(video_id) if alternatives else ()
        index = builder.video(video_id, video_where, alts)
        if not paragraph:
            for caption in captions:
                builder.caption(index, caption)
        elif index is not None:
            if index not in grouped:
                order.append(index)
            grouped.setdefault(index, []).extend(captions)
    for index in order:
        builder.caption(index, " ".join(grouped[index]))
    return builder.build(source)


# --- DiDeMo -------------------------------------------------------------------------------------------


def load_didemo(
    data_json: PathLike,
    video_root: PathLike,
    split_list: PathLike | None = None,
    paragraph: bool = True,
    on_missing: str = "raise",
) -> RetrievalAnnotations:
    """DiDeMo paragraph-to-video: every description of a video joined into one query (CLIP4Clip).

    ``data_json`` is the original DiDeMo list (``video``, ``description``, ``times``...) or a STAN-style dict
    ``{video: [sentences]}``; ``split_list`` (``{split}_list.txt``) keeps only the videos it names, as
    CLIP4Clip does. Ids keep their original extension (``...avi``); re-encoded files (``.mp4``) are found too.
    """
    data = read_json(data_json)
    keep = _split_ids(split_list)
    entries: list[tuple[str, Any, Any]] = []
    if isinstance(data, dict):
        entries = [(f"{data_json}: entry {k!r}", k, v) for k, v in data.items() if keep is None or k in keep]
    elif isinstance(data, list):
        for i, entry in enumerate(data):
            where = f"{data_json}: entry {i}"
            video_id = require_field(entry, "video", where)
            if keep is None or video_id in keep:
                entries.append((where, video_id, require_field(entry, "description", where)))
    else:
        raise DatasetError(f"{data_json}: expected the DiDeMo json list or a dict video -> sentences")
    return _from_entries(
        entries, f"didemo:{Path(data_json).name}", str(data_json), video_root, paragraph, on_missing
    )


# --- MSVD ---------------------------------------------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle encodes natively (dict, list, tuple, str, numbers): no class is ever
    imported, so a crafted file cannot run code. CLIP4Clip's ``raw-captions.pkl`` needs nothing more."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain dicts/lists/strings")


def _msvd_captions(path: PathLike) -> dict[str, list[tuple[str, Any]]]:
    """``{video_id: [(where, caption field)]}`` from a .pkl, .json or text captions file."""
    path = existing_file(path)
    out: dict[str, list[tuple[str, Any]]] = {}
    if path.suffix == ".pkl":
        try:
            with open(path, "rb") as f:
                data = _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DatasetError(f"{path}: cannot read the captions pickle: {err}") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a dict video id -> captions, got {type(data).__name__}")
        for video_id, captions in data.items():
            if not isinstance(captions, (list, tuple)):
                raise DatasetError(f"{path}: entry {video_id!r}: expected a list of captions")
            for i, cap in enumerate(captions):
                # raw-captions.pkl stores each caption as a list of words.
                text = " ".join(cap) if isinstance(cap, (list, tuple)) else cap
                out.setdefault(str(video_id), []).append((f"{path}: entry {video_id!r}[{i}]", text))
    elif path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a json dict video id -> captions")
        for video_id, captions in data.items():
            out.setdefault(str(video_id), []).append((f"{path}: entry {video_id!r}", captions))
    else:
        for where, line in read_lines(path):
            parts = line.split(maxsplit=1)
            if len(parts) < 2:
                raise DatasetError(f"{where}: expected '<video_id> <caption>', got {line!r}")
            out.setdefault(parts[0], []).append((where, parts[1]))
    return out


def load_msvd(
    split_list: PathLike, captions: PathLike, video_root: PathLike, on_missing: str = "raise"
) -> RetrievalAnnotations:
    """MSVD: the videos of ``split_list`` with every one of their captions as a separate query."""
    by_video = _msvd_captions(captions)
    entries: list[tuple[Any, Any, Any]] = []
    for where, video_id in read_lines(split_list):
        if video_id not in by_video:
            raise DatasetError(f"{where}: video {video_id!r} has no caption in {captions}")
        for caption_where, value in by_video[video_id]:
            entries.append(((where, caption_where), video_id, value))
    return _from_entries(
        entries, f"msvd:{Path(split_list).name}", str(split_list), video_root, False, on_missing
    )


# --- LSMDC --------------------------------------------------------------------------------------------


def load_lsmdc(
    annotations_csv: PathLike, video_root: PathLike, on_missing: str = "raise"
) -> RetrievalAnnotations:
    """LSMDC (``LSMDC16_annos_*.csv``): tab-separated, 6 fields, the sentence last; no header."""
    builder = _Builder(f"lsmdc:{Path(annotations_csv).name}", video_root, on_missing)
    for where, line in read_lines(annotations_csv):
        fields = line.split("\t", 5)
        if len(fields) != 6:
            raise DatasetError(
                f"{where}: expected 6 tab-separated fields (clip_id, start_aligned, end_aligned, "
                f"start_extracted, end_extracted, sentence), got {len(fields)}"
            )
        caption = check_caption(fields[5], where)
        builder.caption(builder.video(fields[0], where), caption)
    return builder.build(str(annotations_csv))


# --- WebVid -------------------------------------------------------------------------------------------


def _webvid_part(value: str, field: str, where: str) -> str:
    """A ``videoid`` / ``page_dir`` value that stays inside the video folder (hostile CSVs exist)."""
    value = value.strip()
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or ".." in parts or (field == "videoid" and len(parts) != 1):
        raise DatasetError(
            f"{where}: {field} {value!r} must be a plain relative name inside the video folder"
        )
    return value


def load_webvid(path: PathLike, video_root: PathLike, on_missing: str = "skip") -> RetrievalAnnotations:
    """WebVid-2M/10M captions, for Mug-STAN's post-pretraining (``configs/mugstan_webvid10m_b32_pretrain.yaml``).

    ``path`` is the released CSV (header with ``videoid``, ``name`` = the caption, ``page_dir``; other columns
    such as ``contentUrl`` and ``duration`` are ignored): one caption per video, the file at
    ``<page_dir>/<videoid>.mp4`` (any known video extension) under ``video_root``. A ``.json`` file is read as
    the official code's ``WeividDataset_filtered`` dict ``{relative video path: caption}``.

    Web-scale downloads always miss some videos, so ``on_missing="skip"`` is the default here: the rows whose
    file is absent are left out and listed in ``annotations.missing`` (the official loader would fail on them
    at read time instead). A bad row (empty caption, a path that leaves the video folder) still raises.
    """
    path = existing_file(path)
    if path.suffix.lower() == ".json":
        return load_caption_json(path, video_root, on_missing=on_missing)
    builder = _Builder(f"webvid:{path.name}", video_root, on_missing)
    for where, row in read_csv_rows(path, ["videoid", "name", "page_dir"]):
        video = f"{_webvid_part(row['page_dir'], 'page_dir', where)}/{_webvid_part(row['videoid'], 'videoid', where)}"
        caption = check_caption(row["name"], where)
        builder.caption(builder.video(video, where), caption)
    return builder.build(str(path))


# --- ActivityNet Captions -----------------------------------------------------------------------------


def load_activitynet(
    data_json: PathLike,
    video_root: PathLike,
    ids_json: PathLike | None = None,
    paragraph: bool = True,
    on_missing: str = "raise",
) -> RetrievalAnnotations:
    """ActivityNet Captions paragraph-to-video (``train.json`` / ``val_1.json``), sentences joined.

    Ids are ``v_<youtube id>``; CLIP4Clip names the files without the ``v_``, so both names are tried.
    ``ids_json`` (``train_ids.json``) keeps only the listed videos.
    """
    data = read_json(data_json)
    if not isinstance(data, dict):
        raise DatasetError(f"{data_json}: expected a dict video id -> {{duration, timestamps, sentences}}")
    keep = _split_ids(ids_json)
    entries = []
    for video_id, entry in data.items():
        if keep is not None and video_id not in keep:
            continue
        where = f"{data_json}: entry {video_id!r}"
        entries.append((where, video_id, require_field(entry, "sentences", where)))

    def alternatives(video_id: str) -> tuple[str, ...]:
        return (video_id[2:],) if video_id.startswith("v_") else ()

    name = f"activitynet:{Path(data_json).name}"
    return _from_entries(entries, name, str(data_json), video_root, paragraph, on_missing, alternatives)


# --- generic ------------------------------------------------------------------------------------------


def load_video_captions(
    path: PathLike, video_root: PathLike, on_missing: str = "raise"
) -> RetrievalAnnotations:
    """A user's own data: CSV with ``video`` and ``caption`` columns, or JSONL/json of ``{video, caption}``.

    Several rows may name the same video; each caption is its own query.
    """
    path = existing_file(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_caption_json(path, video_root, on_missing=on_missing)
    entries: list[tuple[str, Any, Any]] = []
    if suffix == ".jsonl":
        for where, line in read_lines(path):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: invalid JSON: {err.msg}") from None
            entries.append(
                (where, require_field(entry, "video", where), require_field(entry, "caption", where))
            )
    elif suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        for where, row in read_csv_rows(path, ["video", "caption"], delimiter=delimiter):
            entries.append((where, row["video"], row["caption"]))
    else:
        raise DatasetError(
            f"{path}: unknown caption file type {suffix!r} (expected .csv, .tsv, .jsonl or .json)"
        )
    return _from_entries(entries, f"captions:{path.name}", str(path), video_root, False, on_missing)

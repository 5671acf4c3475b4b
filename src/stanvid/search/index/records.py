"""The records the index hands out (a search hit, a segment row, a build report) and takes in (a file found
on disk)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SearchResult:
    """One hit: a segment of a video, its time span in seconds and its cosine similarity to the query."""

    id: int  # segment id (stable across updates of other files)
    file_id: int
    path: str  # absolute path of the video
    relpath: str  # path relative to the indexed folder
    start: float
    end: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Segment:
    """A segment row with what is needed to read its frames."""

    id: int
    file_id: int
    path: str
    relpath: str
    start: float
    end: float
    fps: float
    num_frames: int
    width: int
    height: int
    size: int
    mtime_ns: int


@dataclass
class IndexReport:
    """What a `build_index` run did (on rank 0 of a sharded run: for all ranks)."""

    index: str
    files_seen: int = 0
    indexed: int = 0  # files newly (re-)encoded by this run
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    files: int = 0  # files in the index at the end
    segments: int = 0  # segments in the index at the end
    vector_index: str = ""
    seconds: float = 0.0
    precision: str = ""  # what this run encoded in (resolved: fp32, bf16, fp16, int8)
    built_precision: str = (
        ""  # what the stored embeddings were computed in ("bf16", or "fp32+bf16" when mixed)
    )
    imported: int = 0  # segments imported from embeddings (`from_embeddings`)
    notes: list[str] = field(default_factory=list)  # what an import dropped or left to a normal run
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (vectors: the vector index)

    def summary(self) -> str:
        built = f", built in {self.built_precision}" if self.built_precision else ""
        lines = [
            f"{self.index}: {self.files} videos, {self.segments} segments ({self.vector_index}{built}); this run: "
            f"{self.indexed} indexed, {self.unchanged} unchanged, {self.removed} removed, {len(self.failed)} "
            f"unreadable, {self.seconds:.1f} s, precision {self.precision}"
        ]
        if self.imported:
            lines.append(f"imported {self.imported} segments from embeddings")
        lines += self.notes
        if self.timings:
            lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        if self.failed:
            lines.append("unreadable videos (not indexed):")
            lines += [f"  {path}: {error}" for path, error in self.failed]
        # a folder whose own name is not UTF-8 must not make printing the report fail
        return os.fsencode("\n".join(lines)).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class _FileEntry:
    relpath: str
    size: int
    mtime_ns: int
    device: int | None = None  # identity of the file (the link's target for a symbolic link)
    inode: int | None = None

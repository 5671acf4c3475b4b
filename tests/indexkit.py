"""Helpers the index-like tests share (index, server, query, pipeline, hardening, zero-shot, Mug search, archive,
following): a folder of short generated videos, the tiny model they are indexed with, readers of an index's
rows, and a synthetic archive (stand-in files with `stanvid embed` shards of clustered vectors).
Imported as `from indexkit import ...` (`tests/` is on the path through pyproject's `pythonpath`)."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import stanvid
from stanvid.models.config import CLIPConfig, ModelConfig, STANConfig, TextConfig, VisionConfig
from stanvid.search.index import DB_NAME
from stanvid.video.sampling import uniform_indices
from stanvid.video.transforms import EvalTransform
from videogen import codec_available, make_frames, write_video

FPS = 10
# name -> (frames, seed, codec); durations 2.0 s, 3.5 s, 1.2 s, 2.0 s
VIDEOS = {
    "a.mp4": (20, 1, "h264"),
    "sub/b.mkv": (35, 2, "h264"),
    "sub/deeper/c.MP4": (12, 3, "h264"),
    "d.webm": (20, 4, "vp9"),
}


def index_model(seed: int = 0) -> stanvid.VideoCLIP:
    """The index tests' tiny model (32 px frames, 4 frames, STAN depth 1), seeded; other index-like tests share it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        clip=CLIPConfig(
            embed_dim=16,
            vision=VisionConfig(width=32, layers=2, heads=2, patch_size=8, image_size=32),
            text=TextConfig(width=32, layers=2, heads=2, context_length=16),
        ),
        temporal="stan",
        num_frames=4,
        stan=STANConfig(depth=1),
    )
    return stanvid.VideoCLIP(cfg).eval()


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    index_model(seed).save_pretrained(directory)
    return directory


def write_clip(path: Path, frames: int, seed: int, codec: str = "h264") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec == "vp9" and not codec_available("vp9"):
        codec = "h264"
    return write_video(path, make_frames(frames, 40, 56, seed=seed), fps=FPS, codec=codec, gop=5)


def make_folder(root: Path, videos: dict = VIDEOS) -> Path:
    """The test folder: a few videos (nested, mixed containers), a corrupt one and a non-video file."""
    for name, (frames, seed, codec) in videos.items():
        write_clip(root / name, frames, seed, codec)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not really a video")
    (root / "notes.txt").write_text("not a video")
    return root


def rows(index_dir: Path) -> list[tuple[str, float, float, np.ndarray]]:
    """(relpath, start, end, embedding) of every segment, sorted by path and start: read from SQLite and the
    store file directly (row `slot` at byte 4096 + 4 * dim * slot), not through the index code."""
    with contextlib.closing(sqlite3.connect(index_dir / DB_NAME)) as conn:
        found = conn.execute(
            "SELECT f.path, s.start, s.end, s.slot FROM segments s JOIN files f ON f.id = s.file_id"
        ).fetchall()
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    raw = np.fromfile(index_dir / meta["store"]["file"], dtype=np.float32, offset=4096)
    matrix = raw[: meta["store"]["rows"] * meta["dim"]].reshape(-1, meta["dim"])
    return sorted((p, a, b, matrix[slot].copy()) for p, a, b, slot in found)


def reference_embedding(model, path: Path, start: float, end: float) -> np.ndarray:
    """The second path: frames in [start, end) sampled uniformly, EvalTransform, encode_video, L2-normalize."""
    info = stanvid.probe(path)
    first = math.ceil(start * info.fps - 1e-6)
    last = min(info.num_frames, math.ceil(end * info.fps - 1e-6)) - 1
    idx = first + uniform_indices(last - first + 1, model.config.num_frames)
    size = model.config.clip.vision.image_size
    clip = EvalTransform(size)(stanvid.read_frames(path, idx, size=size))  # (T, 3, S, S)
    with torch.no_grad():
        return F.normalize(model.encode_video(clip[None]), dim=-1)[0].numpy()


# ---------------------------------------------------------------------------------------------- a synthetic archive
DIM, PER_FILE = 16, 20  # the tiny model's dimension; segments per stand-in file


def archive_files(root: Path, first: int, count: int) -> list[tuple[str, int, int]]:
    """`count` stand-in video files (an import never decodes them): (relpath, size, mtime_ns)."""
    out = []
    for i in range(first, first + count):
        path = root / f"f{i:05d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(4, "little") * 3)
        st = path.stat()
        out.append((path.name, st.st_size, st.st_mtime_ns))
    return out


def file_vectors(first: int, count: int, topics: int = 0) -> np.ndarray:
    """(count * PER_FILE, DIM) clustered unit vectors: 8 topic centres (seeded by `topics`), a centre per file
    near one of them, its segments near that."""
    centres = np.random.default_rng(1000 + topics).standard_normal((8, DIM))
    rng = np.random.default_rng(first)
    files = centres[np.arange(first, first + count) % 8] + 0.5 * rng.standard_normal((count, DIM))
    x = files[:, None, :] + 0.3 * rng.standard_normal((count, PER_FILE, DIM))
    x = x.reshape(-1, DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shard(path: Path, files: list[tuple[str, int, int]], vectors: np.ndarray, segments: list[int] | None = None,
                **header) -> Path:  # fmt: skip
    """A `stanvid embed` output written here by hand (the second writer of the format); `segments`: one-second
    segments per file (default `PER_FILE` each)."""
    head = {"model": "tiny", "model_fingerprint": stanvid.model_fingerprint(index_model()), "dim": DIM,
            "segment_seconds": 1.0, "root": "/elsewhere", "vectors": path.with_suffix(".npy").name, **header}  # fmt: skip
    rows_ = [{"path": p, "start": float(j), "end": float(j + 1), "size": s, "mtime_ns": m}
             for (p, s, m), n in zip(files, segments or [PER_FILE] * len(files), strict=True)
             for j in range(n)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".npy"), vectors)
    path.with_suffix(".json").write_text(json.dumps({**head, "rows": rows_}))
    return path.with_suffix(".json")


def add_files(root: Path, shards: Path, first: int, count: int, topics: int = 0) -> Path:
    files = archive_files(root, first, count)
    return write_shard(shards / f"part-{first:05d}.json", files, file_vectors(first, count, topics))

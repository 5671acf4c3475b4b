"""The indexer's pipeline: the thread budget's rules, and batching that never changes what is stored."""

from __future__ import annotations

import contextlib
import sqlite3

import numpy as np
import pytest
import torch

import stanvid.video.pipeline as pipeline
from stanvid.video.pipeline import encode_batch_size, thread_budget

pytest.importorskip("faiss")
from indexkit import VIDEOS, make_folder, rows, save_tiny_model  # noqa: E402
from stanvid.search.index import DB_NAME, build_index  # noqa: E402


@pytest.mark.parametrize(
    "cores,workers,expected",
    [
        (2, None, (2, 0)),  # small CPU: alternate, every core for each side
        (2, 1, (2, 1)),  # explicit worker obeyed, the model keeps its cores
        (16, None, (14, 2)),  # large CPU: decoders beside the model
        (16, 4, (12, 4)),
    ],
)
def test_cpu_thread_budget(monkeypatch, cores, workers, expected):
    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    budget = thread_budget(torch.device("cpu"), workers)
    assert (budget.model_threads, budget.decode_workers) == expected


def test_cuda_budget_and_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr(pipeline, "available_cores", lambda: 16)
    assert thread_budget(torch.device("cuda"), None) == pipeline.ThreadBudget(1, 15)
    assert thread_budget(torch.device("cpu"), None, processes_per_node=8).decode_workers == 0  # 2 cores each


def test_encode_batch_size():
    cpu = torch.device("cpu")
    assert encode_batch_size(600, cpu, 16) == 4  # ViT-B/32, 12 frames: 4 clips reach the GEMM peak
    assert encode_batch_size(600, cpu, 2) == 2  # never above the commit size
    assert encode_batch_size(10_000, cpu, 16) == 1


def test_small_forward_batches_store_the_same_index(tmp_path, monkeypatch):
    """Forward batches of 2 clips with commits every 5 (remainders spanning files, files spanning batches)
    store exactly what one batch per commit stores."""
    root = make_folder(tmp_path / "videos")
    model_dir = save_tiny_model(tmp_path / "model")
    common = dict(segment_seconds=1.0, num_workers=0, precision="fp32", progress=False)
    build_index(root, tmp_path / "reference", model_dir, batch_size=5, **common)
    rows_per_clip = 4 * 17  # the tiny model: 4 frames x (16 patches + class token)
    monkeypatch.setattr(pipeline, "CPU_ROWS_PER_BATCH", 2 * rows_per_clip)
    commits = []
    report = build_index(
        root, tmp_path / "small", model_dir, batch_size=5, on_commit=commits.append, **common
    )
    assert report.indexed == len(VIDEOS) and commits[-1] == len(VIDEOS)
    got, want = rows(tmp_path / "small"), rows(tmp_path / "reference")
    assert [r[:3] for r in got] == [r[:3] for r in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a[3], b[3], atol=1e-6)
    with contextlib.closing(sqlite3.connect(tmp_path / "small" / DB_NAME)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == len(got)

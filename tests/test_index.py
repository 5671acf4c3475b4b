"""The video index: build, search, update, resume, model identity, sharded builds (tiny random models, small videos).

Every embedding and ranking is checked against a second path: frames read with `stanvid.read_frames`, preprocessed
with `EvalTransform` and encoded directly, then ranked by a brute-force dot product.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("faiss")

import stanvid  # noqa: E402
from indexkit import (  # noqa: E402
    VIDEOS,
    index_model,
    make_folder,
    reference_embedding,
    rows,
    save_tiny_model,
    write_clip,
)
from stanvid.cli import main as cli_main  # noqa: E402
from stanvid.models.tokenizer import tokenize  # noqa: E402
from stanvid.search.index import (  # noqa: E402
    DB_NAME,
    SHARD_DIR,
    VideoIndexError,
    make_vector_index,
    model_fingerprint,
    segment_bounds,
)
from stanvid.search.index import build_index as _build_index  # noqa: E402
from stanvid.search.index import open_index as _open_index  # noqa: E402
from stanvid.search.index import search_index as _search_index  # noqa: E402

# This file checks storage and ranking against float32 references at float32 tolerances, so it pins the
# precision (the default, auto, is bf16 on a CPU with native bf16); tests/test_precision.py covers the others.
build_index = functools.partial(_build_index, precision="fp32")
open_index = functools.partial(_open_index, precision="fp32")
search_index = functools.partial(_search_index, precision="fp32")
FP32 = ["--precision", "fp32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir):
    """A folder and its 1-second-segment index, built once for the read-only tests."""
    root = make_folder(tmp_path_factory.mktemp("videos"))
    out = tmp_path_factory.mktemp("index") / "idx"
    report = build_index(
        root, out, model_dir, segment_seconds=1.0, batch_size=3, num_workers=0, progress=False
    )
    return root, out, report


# ---------------------------------------------------------------------------------------------- build + search
def test_build_indexes_every_readable_segment_and_lists_the_broken_file(built, model_dir):
    root, out, report = built
    assert report.failed and report.failed[0][0] == str(root / "broken.mp4")
    assert "broken.mp4" not in report.failed[0][1]  # the path is shown once, not repeated in the message
    assert len(report.failed) == 1 and report.indexed == len(VIDEOS) and report.files == len(VIDEOS)
    model = stanvid.load_model(model_dir)
    found = rows(out)
    expected = []
    for name in VIDEOS:
        info = stanvid.probe(root / name)
        expected += [(name, a, b) for a, b in segment_bounds(info.duration, 1.0)]
    assert [(p, a, b) for p, a, b, _ in found] == sorted(expected)
    assert report.segments == len(expected)
    for path, start, end, emb in found:
        np.testing.assert_allclose(emb, reference_embedding(model, root / path, start, end), atol=2e-5)
    assert "broken" in " ".join(p for p, _ in open_index(out).failures)


def test_search_ranks_like_brute_force(built, model_dir):
    _, out, _ = built
    model = stanvid.load_model(model_dir)
    found = rows(out)
    matrix = np.stack([e for *_, e in found])  # (N, D)
    for text in ("a dog catches a frisbee", "someone cooking pasta"):
        with torch.no_grad():
            q = F.normalize(model.encode_text(tokenize([text], context_length=16)), dim=-1)[0].numpy()
        scores = matrix @ q
        order = np.argsort(-scores, kind="stable")[:5]
        hits = search_index(out, text, k=5)
        assert [(h.relpath, h.start) for h in hits] == [(found[i][0], found[i][1]) for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
        assert all(Path(h.path).is_file() for h in hits)
    assert len(search_index(out, "anything", k=1000)) == len(found)  # k larger than the index


def test_whole_video_entries_without_segments(tmp_path, model_dir):
    root = make_folder(tmp_path / "v")
    out = tmp_path / "idx"
    report = build_index(root, out, model_dir, num_workers=0, progress=False)
    model = stanvid.load_model(model_dir)
    found = rows(out)
    assert [p for p, *_ in found] == sorted(VIDEOS) and report.segments == len(VIDEOS)
    for path, start, end, emb in found:
        info = stanvid.probe(root / path)
        assert (start, end) == (0.0, info.duration)
        np.testing.assert_allclose(emb, reference_embedding(model, root / path, start, end), atol=2e-5)


def test_decoding_workers_give_the_same_index(tmp_path, model_dir, built):
    root, out, _ = built
    other = tmp_path / "idx"
    build_index(root, other, model_dir, segment_seconds=1.0, batch_size=2, num_workers=2, progress=False)
    for (p1, a1, b1, e1), (p2, a2, b2, e2) in zip(rows(out), rows(other), strict=True):
        assert (p1, a1, b1) == (p2, a2, b2)
        np.testing.assert_allclose(e1, e2, atol=1e-6)


def test_an_index_inside_the_video_folder_is_not_walked(tmp_path, model_dir, built):
    root = make_folder(tmp_path / "v")
    out = root / "search-index"
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    (out / "stray.mp4").write_bytes(b"would fail if it were walked")
    report = build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    assert report.files_seen == len(VIDEOS) + 1  # the videos and broken.mp4, nothing under the index
    assert [r[:3] for r in rows(out)] == [r[:3] for r in rows(built[1])]


def test_segment_bounds():
    assert segment_bounds(2.5, 1.0) == [(0.0, 1.0), (1.0, 2.0), (2.0, 2.5)]
    assert segment_bounds(2.0, 1.0) == [(0.0, 1.0), (1.0, 2.0)]
    assert segment_bounds(0.4, 1.0) == [(0.0, 0.4)]
    assert segment_bounds(3.0, None) == [(0.0, 3.0)]
    assert segment_bounds(0.0, 1.0) == []


# ---------------------------------------------------------------------------------------------- updates
def test_rerun_encodes_only_new_and_changed_files_and_drops_deleted(tmp_path, model_dir):
    root = make_folder(tmp_path / "v")
    out = tmp_path / "idx"
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    before = {p: e for p, a, _, e in rows(out) if a == 0.0}
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:
        ids_before = dict(conn.execute("SELECT path, id FROM files"))

    write_clip(root / "a.mp4", 20, seed=99)  # same name, new content
    os.utime(root / "a.mp4", ns=(1, 1_000_000_000))  # and a different mtime even on coarse clocks
    (root / "sub/b.mkv").unlink()
    write_clip(root / "new.mov", 15, seed=5)
    commits = []
    report = build_index(
        root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False, on_commit=commits.append
    )
    assert (report.indexed, report.removed, report.unchanged) == (2, 1, len(VIDEOS) - 2)
    assert commits and commits[-1] == 2

    model = stanvid.load_model(model_dir)
    after = rows(out)
    paths = sorted({p for p, *_ in after})
    assert paths == sorted(["a.mp4", "new.mov", "sub/deeper/c.MP4", "d.webm"])
    for path, start, end, emb in after:
        np.testing.assert_allclose(emb, reference_embedding(model, root / path, start, end), atol=2e-5)
    assert not np.allclose(dict((p, e) for p, a, _, e in after if a == 0.0)["a.mp4"], before["a.mp4"])
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:
        ids_after = dict(conn.execute("SELECT path, id FROM files"))
    for unchanged in ("sub/deeper/c.MP4", "d.webm"):  # not re-encoded: same rows
        assert ids_after[unchanged] == ids_before[unchanged]
    assert len(list(out.glob("embeddings-*.f32"))) == 1  # one store, appended to
    assert not list(out.glob("vectors-*.faiss"))  # an exact index needs no vector index file

    report = build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    assert (report.indexed, report.removed, report.unchanged) == (0, 0, 4)


def test_file_that_becomes_unreadable_is_dropped_and_listed(tmp_path, model_dir):
    root = make_folder(tmp_path / "v")
    out = tmp_path / "idx"
    build_index(root, out, model_dir, num_workers=0, progress=False)
    (root / "a.mp4").write_bytes(b"garbage now")
    report = build_index(root, out, model_dir, num_workers=0, progress=False)
    assert sorted(Path(p).name for p, _ in report.failed) == ["a.mp4", "broken.mp4"]
    assert "a.mp4" not in {p for p, *_ in rows(out)}
    assert all(h.relpath != "a.mp4" for h in search_index(out, "x", k=10))


def test_interrupted_build_resumes_without_loss_or_duplicates(tmp_path, model_dir, built):
    root, complete, _ = built
    out = tmp_path / "idx"

    def stop_after_two(committed: int) -> None:
        if committed == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(
            root,
            out,
            model_dir,
            segment_seconds=1.0,
            batch_size=1,
            num_workers=0,
            progress=False,
            on_commit=stop_after_two,
        )
    partial = rows(out)
    assert len({p for p, *_ in partial}) == 2  # the two committed files survived
    with open_index(out) as index:  # the vector file of that generation was never written: rebuilt in memory
        assert len(index) == len(partial)
        assert {h.relpath for h in index.search("x", k=100)} == {p for p, *_ in partial}

    report = build_index(
        root, out, model_dir, segment_seconds=1.0, batch_size=1, num_workers=0, progress=False
    )
    assert (report.indexed, report.unchanged) == (len(VIDEOS) - 2, 2)
    resumed, reference = rows(out), rows(complete)
    assert [r[:3] for r in resumed] == [r[:3] for r in reference]  # nothing lost, nothing twice
    for r, ref in zip(resumed, reference, strict=True):
        np.testing.assert_allclose(r[3], ref[3], atol=1e-6)


def test_leftover_shards_of_an_interrupted_sharded_run_are_merged(tmp_path, model_dir, built):
    root, complete, _ = built
    out = tmp_path / "idx"
    (out / SHARD_DIR).mkdir(parents=True)
    # a rank's shard has the main index's schema: a finished single-process index stands in for one
    shutil.copy(complete / DB_NAME, out / SHARD_DIR / "rank-00001.sqlite")
    for store in complete.glob("embeddings-*.f32"):  # and its store, under the name its record gives
        shutil.copy(store, out / SHARD_DIR / store.name)
    report = build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    assert (report.indexed, report.unchanged, report.files) == (0, len(VIDEOS), len(VIDEOS))
    assert not (out / SHARD_DIR).exists()
    for r, ref in zip(rows(out), rows(complete), strict=True):
        assert r[:3] == ref[:3]
        np.testing.assert_array_equal(r[3], ref[3])


# ---------------------------------------------------------------------------------------------- identity
def test_a_different_model_is_refused(tmp_path, built, model_dir):
    root, out, _ = built
    other = index_model(seed=1)
    assert model_fingerprint(other) != model_fingerprint(stanvid.load_model(model_dir))
    assert model_fingerprint(index_model(seed=0)) == model_fingerprint(stanvid.load_model(model_dir))
    with pytest.raises(VideoIndexError, match="not the model that built the index"):
        open_index(out, model=other)
    with pytest.raises(VideoIndexError, match="built with another model"):
        build_index(root, out, other, num_workers=0, progress=False, segment_seconds=1.0)
    with pytest.raises(VideoIndexError, match="segment length"):
        build_index(root, out, model_dir, num_workers=0, progress=False, segment_seconds=2.0)

    # the recorded source now holds other weights: refused as well
    swapped = tmp_path / "model"
    save_tiny_model(swapped, seed=0)
    build_index(root, tmp_path / "idx2", swapped, num_workers=0, progress=False)
    save_tiny_model(swapped, seed=1)
    with pytest.raises(VideoIndexError, match="not the model"):
        search_index(tmp_path / "idx2", "x")


def test_an_in_memory_model_must_be_passed_back(tmp_path, built):
    root, _, _ = built
    model = index_model(seed=3)
    build_index(root, tmp_path / "idx", model, num_workers=0, progress=False)
    with pytest.raises(VideoIndexError, match="in-memory model"):
        search_index(tmp_path / "idx", "x")
    assert len(search_index(tmp_path / "idx", "x", model=index_model(seed=3))) == len(VIDEOS)


def test_bad_arguments(tmp_path, built, model_dir):
    root, out, _ = built
    with pytest.raises(VideoIndexError, match="not a directory"):
        build_index(tmp_path / "missing", tmp_path / "i", model_dir, progress=False)
    with pytest.raises(VideoIndexError, match="segment_seconds"):
        build_index(root, tmp_path / "i", model_dir, segment_seconds=0, progress=False)
    with pytest.raises(VideoIndexError, match="no index here"):
        open_index(tmp_path / "nothing")
    with open_index(out) as index:
        with pytest.raises(VideoIndexError, match="empty"):
            index.search("   ")
        with pytest.raises(VideoIndexError, match="k must be"):
            index.search("x", k=0)


# ---------------------------------------------------------------------------------------------- vector index
def test_ivf_probing_every_cell_equals_exact_search():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(10, 2010, dtype=np.int64)
    queries = vectors[:20] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    exact = make_vector_index(vectors, ids, kind="flat")
    ivf = make_vector_index(vectors, ids, kind="ivf", nlist=8, nprobe=8)
    d1, i1 = exact.search(queries, 10)
    d2, i2 = ivf.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-5)
    brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10] + 10
    np.testing.assert_array_equal(i1, brute)
    auto = make_vector_index(vectors, ids, kind="auto", approx_threshold=1000)
    assert auto.nprobe < auto.nlist  # approximate above the threshold


def test_build_switches_to_an_approximate_index_above_the_threshold(tmp_path, built, model_dir):
    root, exact_dir, _ = built
    out = tmp_path / "idx"
    report = build_index(
        root,
        out,
        model_dir,
        segment_seconds=1.0,
        num_workers=0,
        progress=False,
        approx_threshold=1,
        nlist=2,
        nprobe=2,
    )
    assert report.vector_index.startswith("approximate IVF")
    exact = search_index(exact_dir, "a red car", k=5)
    approx = search_index(out, "a red car", k=5)  # every cell probed: same answer
    assert [(h.relpath, h.start) for h in approx] == [(h.relpath, h.start) for h in exact]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_index_and_search(tmp_path, capsys, built, model_dir):
    root, reference, _ = built
    out = tmp_path / "idx"
    code = cli_main(
        [
            "index",
            str(root),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--segment-seconds",
            "1",
            "--workers",
            "0",
            "--no-progress",
            *FP32,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "broken.mp4" in printed and f"{len(VIDEOS)} videos" in printed
    assert cli_main(["search", str(out), "a person running", "-k", "4", "--json", *FP32]) == 0
    hits = json.loads(capsys.readouterr().out)
    expected = search_index(reference, "a person running", k=4)
    assert [(h["relpath"], h["start"], h["end"]) for h in hits] == [
        (h.relpath, h.start, h.end) for h in expected
    ]
    assert cli_main(["search", str(out), "a person running", "-k", "2", *FP32]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[-1] == expected[0].path

    save_tiny_model(tmp_path / "other", seed=7)
    code = cli_main(
        ["index", str(root), "--model", str(tmp_path / "other"), "--out", str(out), "--no-progress"]
    )
    assert code == 2
    assert "another model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, built, model_dir, free_port):
    root, reference, _ = built
    out = tmp_path / "idx"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(model: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port), "-m", "stanvid.cli", "index", str(root), "--model", str(model),
               "--out", str(out), "--segment-seconds", "1", "--workers", "0", "--batch-size", "2", "--no-progress", *FP32]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    done = torchrun(model_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(VIDEOS)} indexed" in done.stdout and "broken.mp4" in done.stdout
    assert not (out / SHARD_DIR).exists()
    for r, ref in zip(rows(out), rows(reference), strict=True):
        assert r[:3] == ref[:3]
        np.testing.assert_allclose(r[3], ref[3], atol=1e-5)
    merged, single = search_index(out, "a cat", k=5), search_index(reference, "a cat", k=5)
    assert [(h.relpath, h.start) for h in merged] == [(h.relpath, h.start) for h in single]

    # a failure on rank 0 (another model for this index) reaches every rank: all exit, none waits forever
    done = torchrun(save_tiny_model(tmp_path / "other", seed=4))
    assert done.returncode != 0
    assert "another model" in done.stderr and "rank 0 failed" in done.stderr

"""An open index follows the index on disk (issue 27): it answers from one generation until it moves, moves
when asked (`refresh`), on use (`follow`) or in a thread of its own (`watch`), answers each call from one
generation even across a compaction that renumbers every slot, honours `k` whatever was deleted, refuses a
damaged new vector file while the old generation keeps answering, and lets SQLite restart its log.

Second paths: the rows read from SQLite and the store file directly (`indexkit.rows`), brute force over them,
and a freshly opened index compared with one that followed the same updates incrementally.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

import stanvid  # noqa: E402
from indexkit import DIM, PER_FILE, add_files, index_model, make_folder, rows, save_tiny_model  # noqa: E402
from stanvid.search.index import DB_NAME, VideoIndexError  # noqa: E402
from stanvid.search.index import build_index as _build_index  # noqa: E402
from stanvid.search.index import follow as follow_module  # noqa: E402

build_index = functools.partial(_build_index, num_workers=0, progress=False, segment_seconds=1.0)
APPROX = {"approx_threshold": 100}  # IVF-PQ from 100 vectors: the approximate path at test sizes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def open_index(out: Path, **kw) -> stanvid.VideoIndex:
    return stanvid.open_index(out, model=index_model(), **kw)


def queries(n: int = 6, seed: int = 3) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, DIM))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def answers(index: stanvid.VideoIndex, k: int = 10**6) -> list[list[tuple[str, float, float]]]:
    """Every query's hits as (relpath, start, score): what a generation answers."""
    return [
        [(h.relpath, h.start, round(h.score, 5)) for h in res]
        for res in index.search_embeddings(queries(), k)
    ]


def brute_force(out: Path, k: int = 10**6) -> list[list[tuple[str, float, float]]]:
    """The same from the rows on disk, exactly."""
    found = rows(out)
    matrix = np.stack([e for *_, e in found])
    out_ = []
    for q in queries():
        s = matrix @ q
        order = np.lexsort((np.arange(len(s)), -s))[:k]
        out_.append([(found[i][0], found[i][1], float(s[i])) for i in order])
    return out_


def db_counts(out: Path) -> tuple[int, int, int]:
    """(generation, files, segments) committed on disk, read with sqlite3 directly."""
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:
        gen = int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
        files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        segments = conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
    return gen, files, segments


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {timeout} s")
        time.sleep(0.02)


def same_ranking(a: list, b: list) -> None:
    """Two answers agree: the same hits, best first, with the same scores (float32 sums may differ in the
    last bits, so equal scores may come in either order)."""
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        xs, ys = dict((h[:2], h[2]) for h in x), dict((h[:2], h[2]) for h in y)
        assert xs.keys() == ys.keys()
        np.testing.assert_allclose([xs[key] for key in ys], list(ys.values()), atol=1e-5)
        np.testing.assert_allclose([h[2] for h in x], [h[2] for h in y], atol=1e-5)  # the same order


# ---------------------------------------------------------------------------------------------- generations
def test_an_open_index_answers_from_its_generation_until_it_moves(tmp_path, model_dir):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 30)
    build_index(root, out, model_dir, from_embeddings=str(shards))
    index = open_index(out, follow=None)
    before, g0 = answers(index), index.generation
    same_ranking(before, brute_force(out))

    add_files(root, shards, 30, 10)  # a run adds 10 files
    build_index(root, out, model_dir, from_embeddings=str(shards))
    assert index.committed_generation() > g0 == index.generation
    assert (len(index), index.num_files()) == (30 * PER_FILE, 30)  # one truth: the generation it answers from
    same_ranking(answers(index), before)
    assert index.refresh() and not index.refresh()
    assert (index.generation, index.num_files(), len(index)) == db_counts(out)
    mid = answers(index)
    same_ranking(mid, brute_force(out))
    vec = {p: e for p, a, _, e in rows(out) if a == 0.0}  # each file's first segment, read from disk
    assert index.search_embeddings(vec["f00035.mp4"][None], 1)[0][0].relpath == "f00035.mp4"  # a new file

    with index.pinned() as old:  # a view held across a run that deletes more than half: a compaction
        for i in range(22):
            (root / f"f{i:05d}.mp4").unlink()
        build_index(root, out, model_dir)
        assert [p.name for p in out.glob("embeddings-*.f32")] == ["embeddings-1.f32"]  # every slot renumbered
        assert index.refresh()
        # the view still answers from its generation, through its own read transaction and store file
        assert old.generation < index.generation and len(old) == 40 * PER_FILE and old.num_files() == 40
        same_ranking(answers(old), mid)
        hits = old.search_embeddings(vec["f00003.mp4"][None], 3)[0]
        assert (
            hits[0].relpath == "f00003.mp4" and hits[0].start == 0.0
        )  # a deleted file, in the old generation
        np.testing.assert_allclose(
            old.segment_embeddings([h.id for h in hits]) @ vec["f00003.mp4"],
            [h.score for h in hits],
            atol=1e-5,
        )
        assert old.file_relpath(hits[0].file_id) == "f00003.mp4"
        assert index.file_relpath(hits[0].file_id) is None  # gone from the new one
    same_ranking(answers(index), brute_force(out))
    assert (index.generation, index.num_files(), len(index)) == db_counts(out)
    for k in (1, 7, 18 * PER_FILE, 10**6):  # k honoured whatever was deleted
        assert all(len(r) == min(k, 18 * PER_FILE) for r in index.search_embeddings(queries(), k))
    files = index.query(
        stanvid.Query(like=index.search_embeddings(queries()[:1], 1)[0][0].id), 50, group_by="file"
    )
    assert len(files) == 18 and {f.best.relpath for f in files} == {f"f{i:05d}.mp4" for i in range(22, 40)}
    index.close()


@pytest.mark.parametrize("settings", [{}, APPROX], ids=["exact", "ivfpq"])
def test_following_updates_equals_opening_afresh(tmp_path, model_dir, settings):
    """An index that followed a series of runs (its searcher brought up to date from the previous one: the
    exact index copied, the main file and delta reused) answers exactly as one opened after them."""
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 40)
    build_index(root, out, model_dir, from_embeddings=str(shards), **settings)
    index = open_index(out, follow=None)
    steps = [
        lambda: add_files(root, shards, 40, 2),  # into the delta
        lambda: (root / "f00041.mp4").unlink(),  # out of the delta
        lambda: (root / "f00005.mp4").unlink(),  # out of the main file
        lambda: add_files(root, shards, 42, 1),
        lambda: add_files(root, shards, 43, 6),  # past 10 %: a merge, a new main file
    ]
    for i, step in enumerate(steps):
        files = index.vectors.files if settings else None
        step()
        build_index(root, out, model_dir, from_embeddings=str(shards), **settings)
        assert index.refresh()
        if settings:  # the main file mapped once and reused until a merge writes another
            assert (index.vectors.files == files) == (i < len(steps) - 1)
        with open_index(out, follow=None) as fresh:
            assert (fresh.generation, len(fresh), fresh.num_files()) == (
                index.generation,
                len(index),
                index.num_files(),
            )
            same_ranking(answers(index, 25), answers(fresh, 25))
            if settings:
                assert index.vectors.delta.ntotal == fresh.vectors.delta.ntotal
    index.close()


# ---------------------------------------------------------------------------------------------- refusal
def test_a_damaged_new_vector_file_is_refused_and_the_last_good_generation_answers(
    tmp_path, model_dir, caplog
):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 40)
    build_index(root, out, model_dir, from_embeddings=str(shards), **APPROX)
    index = open_index(out, follow=None)
    good, g0 = answers(index, 20), index.generation
    add_files(root, shards, 40, 8)  # past 10 %: a new main file
    build_index(root, out, model_dir, from_embeddings=str(shards), **APPROX)
    with open_index(out, follow=None) as fresh:
        new_file = out / fresh.meta["ann"]["file"]
    assert new_file.name != index.meta["ann"]["file"]
    data = bytearray(new_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    new_file.write_bytes(bytes(data))

    with (
        caplog.at_level(logging.WARNING, logger="stanvid"),
        pytest.raises(VideoIndexError, match=new_file.name),
    ):
        index.refresh()
    assert "not following the update" in caplog.text and new_file.name in caplog.text
    assert index.generation == g0 and len(index) == 40 * PER_FILE
    same_ranking(answers(index, 20), good)  # the last good generation, whole
    assert not index._follower.poll()  # the background check does not raise: it logs and tries later
    assert index.generation == g0

    build_index(root, out, model_dir, **APPROX)  # the next run sees the damage and writes a good file
    assert index.refresh()
    with open_index(out, follow=None) as fresh:
        assert fresh.vectors.kind == "ivfpq"
        same_ranking(answers(index, 20), answers(fresh, 20))
    index.close()


# ---------------------------------------------------------------------------------------------- who moves it
def test_on_use_the_index_moves_in_the_background_and_each_call_is_one_generation(tmp_path, model_dir):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 10)
    build_index(root, out, model_dir, from_embeddings=str(shards))
    index = open_index(out, follow=0.0)  # check on every call
    old = {h[:2] for h in answers(index)[0]}
    add_files(root, shards, 10, 5)
    build_index(root, out, model_dir, from_embeddings=str(shards))
    new = {h[:2] for h in brute_force(out)[0]}
    target = db_counts(out)[0]

    def moved() -> bool:
        got = {h[:2] for h in answers(index)[0]}
        assert got in (old, new)  # either generation, whole, never a mix
        return index.generation == target

    wait_for(moved, "moved to the committed generation")
    same_ranking(answers(index), brute_force(out))
    index.close()


def test_watch_moves_before_the_next_call(tmp_path, model_dir):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 10)
    build_index(root, out, model_dir, from_embeddings=str(shards))
    index = open_index(out, follow=None)
    index.watch(0.02)
    add_files(root, shards, 10, 5)
    build_index(root, out, model_dir, from_embeddings=str(shards))
    wait_for(lambda: index.generation == db_counts(out)[0], "followed by the watcher")  # no call made
    assert (index.num_files(), len(index)) == db_counts(out)[1:]
    watcher = index._follower._watcher
    index.close()
    assert watcher is not None and not watcher.is_alive()


def test_an_index_built_again_from_scratch_is_followed(tmp_path, model_dir):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 10)
    build_index(root, out, model_dir, from_embeddings=str(shards))
    index = open_index(out, follow=None)
    shutil.rmtree(out)
    assert not index.refresh()  # nothing committed meanwhile: the old generation answers
    assert len(answers(index)[0]) == 10 * PER_FILE
    (root / "f00000.mp4").unlink()
    build_index(root, out, model_dir, from_embeddings=str(shards))
    assert index.refresh()
    same_ranking(answers(index), brute_force(out))
    index.close()


# ---------------------------------------------------------------------------------------------- SQLite
def test_a_long_lived_index_lets_sqlite_restart_its_log(tmp_path, model_dir, monkeypatch):
    """A read transaction held open keeps SQLite from restarting its write-ahead log, so a following index
    renews its own when nothing changed: after that, the log stops growing with each run."""
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 5)
    build_index(root, out, model_dir, from_embeddings=str(shards))
    wal = out / f"{DB_NAME}-wal"
    index = open_index(out, follow=None)

    def runs(first: int, renew: bool) -> list[int]:
        sizes = []
        for i in range(first, first + 3):
            add_files(root, shards, i, 1)
            build_index(root, out, model_dir, from_embeddings=str(shards))
            assert index.refresh()
            if renew:
                assert not index._follower.poll()
            sizes.append(wal.stat().st_size)
        return sizes

    held = runs(5, renew=False)
    assert held[0] < held[1] < held[2]  # the log only grows while a snapshot holds its old position
    monkeypatch.setattr(follow_module, "REANCHOR_SECONDS", 0.0)
    assert not index._follower.poll()  # nothing new: the snapshot renews its read transaction
    renewed = runs(8, renew=True)
    assert max(renewed) <= held[2]  # restarted from its beginning by each run: no growth
    same_ranking(answers(index), brute_force(out))
    index.close()


# ---------------------------------------------------------------------------------------------- Mug, files
def test_mug_rerank_and_files_answer_from_one_generation_and_honour_k(tmp_path):
    model = index_model(seed=5)
    model.config.similarity = "mug"  # the index keeps per-frame vectors; search re-ranks with the Mug head
    model_dir = tmp_path / "mug"
    model.save_pretrained(model_dir)
    root, out = make_folder(tmp_path / "videos"), tmp_path / "idx"
    build_index(root, out, model_dir)
    index = stanvid.open_index(out, follow=None)
    total = len(index)
    with index.pinned() as old:
        (root / "a.mp4").unlink()
        build_index(root, out, model_dir)
        assert index.refresh()
        hits = old.search("a red square", k=50)  # the old generation: a.mp4's per-frame vectors still read
        assert len(hits) == total and "a.mp4" in {h.relpath for h in hits}
    live = db_counts(out)[2]
    assert len(index) == live < total
    for k in (2, live, 50):
        hits = index.search("a red square", k=k)
        assert len(hits) == min(k, live) and "a.mp4" not in {h.relpath for h in hits}
    grouped = index.query("a red square", k=10, group_by="file")
    assert len(grouped) == index.num_files() == 3 and "a.mp4" not in {g.best.relpath for g in grouped}
    assert sum(len(g.timeline) for g in grouped) == live
    index.close()

"""The archive index (issue 24): embeddings assembled from `stanvid embed` outputs, updates that touch only what
changed (a delta and deletions over an untouched main file, a merge past 10 %, a retrain past 4x growth or on
--rebuild), the store compacted when half of it is dead, recall measured and recorded, and a run SIGKILLed at
several points that loses nothing and serves nothing twice.

Small sizes with the thresholds lowered (IVF-PQ from 100 vectors), so every path runs in seconds; every search
is checked against a brute-force ranking of the rows read from the store file directly (`indexkit.rows`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

import stanvid  # noqa: E402
from indexkit import (  # noqa: E402
    DIM,
    PER_FILE,
    VIDEOS,
    add_files,
    archive_files,
    file_vectors,
    index_model,
    make_folder,
    rows,
    save_tiny_model,
    write_shard,
)
from stanvid.cli import main as cli_main  # noqa: E402
from stanvid.search.embed import embed_videos  # noqa: E402
from stanvid.search.index import build_index as _build_index  # noqa: E402
from stanvid.search.index import open_index  # noqa: E402

build_index = functools.partial(_build_index, num_workers=0, progress=False, segment_seconds=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def check_search(out: Path, queries: int = 12, k: int = 10, min_recall: float = 0.9) -> float:
    """Searches of the open index against brute force over the store's rows: scores exact, k honoured,
    recall@k at least `min_recall`; returns the recall."""
    found = rows(out)
    matrix = np.stack([e for *_, e in found])
    keys = [(p, a) for p, a, *_ in found]
    rng = np.random.default_rng(1)
    q = matrix[rng.choice(len(matrix), queries, replace=False)] + 0.05 * rng.standard_normal((queries, DIM))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    hits = 0
    with open_index(out, model=index_model()) as index:
        assert len(index) == len(found)
        for vec, res in zip(q, index.search_embeddings(q, k), strict=True):
            assert len(res) == min(k, len(found))  # k honoured, deleted files or not
            exact = matrix @ vec
            by_key = dict(zip(keys, exact, strict=True))
            np.testing.assert_allclose(
                [h.score for h in res], [by_key[h.relpath, h.start] for h in res], atol=1e-5
            )
            truth = {keys[i] for i in np.argsort(-exact, kind="stable")[:k]}
            hits += len({(h.relpath, h.start) for h in res} & truth)
    recall = hits / (queries * k)
    assert recall >= min_recall
    return recall


def ann(out: Path) -> dict:
    """The vector index record, less the files' identities (recorded by any run once the files settle)."""
    with open_index(out, model=index_model()) as index:
        return {k: v for k, v in (index.meta.get("ann") or {}).items() if not k.endswith("_identity")}


# ---------------------------------------------------------------------------------------------- embed -> import
@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_embed_then_import_is_the_index_a_normal_run_builds(tmp_path, model_dir, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    root = make_folder(tmp_path / "videos")
    direct = tmp_path / "direct"
    build_index(root, direct, model_dir, precision="fp32")
    out = tmp_path / "emb" / f"features{suffix}"
    out.parent.mkdir()
    embed_videos(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False, precision="fp32")
    report = build_index(root, tmp_path / "imported", model_dir, from_embeddings=str(out.parent))
    assert report.imported == len(rows(direct)) and report.indexed == len(VIDEOS)
    assert "broken.mp4" not in " ".join(p for p, *_ in rows(tmp_path / "imported"))
    for r, ref in zip(rows(tmp_path / "imported"), rows(direct), strict=True):
        assert r[:3] == ref[:3]
        np.testing.assert_array_equal(r[3], ref[3])
    again = build_index(root, tmp_path / "imported", model_dir, from_embeddings=str(out.parent))
    assert (again.imported, again.unchanged) == (0, len(VIDEOS))  # already there: nothing written twice
    with open_index(tmp_path / "imported", model=index_model()) as index:
        assert index.search_video("a.mp4:0-1", k=1)[0].relpath == "a.mp4"  # never probed here: probed on use
        assert index.middle_frame(index.search_video("a.mp4:0-1", k=1)[0].id).ndim == 3


def test_embed_shards_split_the_files_and_import_assembles_them(tmp_path, model_dir, capsys):
    root = make_folder(tmp_path / "videos")
    shards = tmp_path / "emb"
    shards.mkdir()
    for i in range(2):
        argv = ["embed", str(root), "--model", str(model_dir), "--out", str(shards / "f.npy"), "--shard", f"{i}/2",
                "--segment-seconds", "1", "--workers", "0", "--no-progress", "--precision", "fp32"]  # fmt: skip
        assert cli_main(argv) == 0
    capsys.readouterr()
    parts = [json.loads((shards / f"f-0000{i}-of-00002.json").read_text())["rows"] for i in range(2)]
    files = [{r["path"] for r in part} for part in parts]
    assert files[0].isdisjoint(files[1]) and files[0] | files[1] == set(VIDEOS)
    argv = ["index", str(root), "--model", str(model_dir), "--out", str(tmp_path / "idx"), "--segment-seconds",
            "1", "--from-embeddings", str(shards / "f-*.json"), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"imported {sum(len(p) for p in parts)} segments" in printed
    direct = tmp_path / "direct"
    build_index(root, direct, model_dir, precision="fp32")
    assert [r[:3] for r in rows(tmp_path / "idx")] == [r[:3] for r in rows(direct)]
    assert cli_main(["embed", str(root), "--model", str(model_dir), "--out", str(shards / "g.npy"), "--shard",
                     "2/2"]) == 2  # fmt: skip
    assert "--shard must be I/N" in capsys.readouterr().err


@pytest.mark.parametrize(
    "header, message",
    [
        ({"model_fingerprint": "0" * 64}, "another model"),
        ({"dim": 8}, "dimension 8"),
        ({"segment_seconds": 2.0}, "segments of 2 s"),
    ],
)
def test_an_import_of_another_model_dimension_or_segmentation_is_refused_naming_the_file(
    tmp_path, model_dir, capsys, header, message
):
    root = tmp_path / "videos"
    good = write_shard(tmp_path / "emb" / "a.json", archive_files(root, 0, 2), file_vectors(0, 2))
    bad = write_shard(tmp_path / "emb" / "b.json", archive_files(root, 2, 2), file_vectors(2, 2), **header)
    argv = ["index", str(root), "--model", str(model_dir), "--out", str(tmp_path / "idx"), "--segment-seconds",
            "1", "--from-embeddings", str(tmp_path / "emb"), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err and len(err.strip().splitlines()) == 1
    assert (
        not rows(tmp_path / "idx") if (tmp_path / "idx" / "index.sqlite").exists() else True
    )  # nothing imported
    assert good.exists()


def test_an_import_under_torchrun_is_refused_before_anything_is_written(tmp_path, model_dir, monkeypatch):
    """Every rank of a torchrun launch would import the whole file set: one line says to run it alone."""
    root = tmp_path / "videos"
    write_shard(tmp_path / "emb" / "a.json", archive_files(root, 0, 2), file_vectors(0, 2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(stanvid.VideoIndexError, match="imports in one process; run it without torchrun"):
        build_index(root, tmp_path / "idx", model_dir, from_embeddings=str(tmp_path / "emb"))
    assert not (tmp_path / "idx").exists()


def test_missing_files_are_dropped_and_changed_ones_encoded_by_the_next_run(tmp_path, model_dir):
    root = make_folder(tmp_path / "videos")
    out = tmp_path / "emb" / "f.npy"
    out.parent.mkdir()
    embed_videos(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False, precision="fp32")
    (root / "d.webm").unlink()
    (root / "a.mp4").write_bytes((root / "a.mp4").read_bytes() + b"\0")  # changed since it was embedded
    idx = tmp_path / "idx"
    report = build_index(root, idx, model_dir, from_embeddings=str(out), precision="fp32")
    text = report.summary()
    assert "not in the folder (d.webm)" in text and "1 file(s) changed since they were embedded" in text
    assert {p for p, *_ in rows(idx)} == {"a.mp4", "sub/b.mkv", "sub/deeper/c.MP4"}
    with open_index(idx, model=index_model()) as index:  # not served: not the file that was embedded
        fid = index.search_video("sub/b.mkv:0-1", k=10)
        a = next(h for h in fid if h.relpath == "a.mp4")
        with pytest.raises(stanvid.IndexedFileError, match="no longer the file"):
            index.open_video(a.file_id)
    report = build_index(root, idx, model_dir, precision="fp32")  # the next normal run encodes it again
    assert report.indexed == 1 and report.unchanged == 2


# ---------------------------------------------------------------------------------------------- updates
def test_updates_cost_what_changed_and_retrain_only_past_growth_or_rebuild(tmp_path, model_dir):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    settings = {"approx_threshold": 100, "from_embeddings": str(shards)}
    add_files(root, shards, 0, 40)  # 800 vectors
    report = build_index(root, out, model_dir, **settings)
    first = ann(out)
    assert first["kind"] == "ivfpq" and first["recall_at_10"] >= 0.95 and first["nprobe"] <= first["nlist"]
    assert f"recall@10 {first['recall_at_10']:.3f}" in report.summary()
    check_search(out)
    store = next(out.glob("embeddings-*.f32"))
    size = store.stat().st_size

    add_files(root, shards, 40, 2)  # 40 vectors, 5 %: into the delta, the main file untouched
    build_index(root, out, model_dir, **settings)
    assert (
        store.stat().st_size == size + 40 * DIM * 4
    )  # the store grew by the new rows, nothing else rewritten
    assert ann(out) == first
    check_search(out)
    with open_index(out, model=index_model()) as index:
        assert index.vectors.delta.ntotal == 40

    (root / "f00003.mp4").unlink()  # a deletion: a tombstone, still no rewrite
    build_index(root, out, model_dir, approx_threshold=100)
    assert ann(out) == first
    check_search(out)
    with open_index(out, model=index_model()) as index:
        assert all(h.relpath != "f00003.mp4" for h in index.search_embeddings(file_vectors(3, 1)[:1], 50)[0])
        assert len(index.search_embeddings(file_vectors(3, 1)[:1], len(index))[0]) == len(index)

    add_files(root, shards, 42, 6)  # past 10 %: merged into the main file, cells kept
    build_index(root, out, model_dir, **settings)
    merged = ann(out)
    assert merged["file"] != first["file"] and merged["trained"] == first["trained"]
    assert merged["count"] == len(rows(out))
    check_search(out)

    add_files(root, shards, 48, 20, topics=1)  # vectors the cells do not fit (other topics): retrained
    build_index(root, out, model_dir, **settings)
    drifted = ann(out)
    assert drifted["trained"] != merged["trained"]
    check_search(out)

    add_files(root, shards, 68, 300)  # 4x the vectors the cells were trained on: retrained
    build_index(root, out, model_dir, **settings)
    grown = ann(out)
    assert grown["trained"] != drifted["trained"]
    assert grown["trained"] != first["trained"] and grown["trained_n"] == len(rows(out))
    check_search(out)
    build_index(root, out, model_dir, approx_threshold=100, rebuild=True)
    assert ann(out)["trained"] != grown["trained"]
    assert sorted(p.name for p in out.glob("*.faiss")) == sorted([ann(out)["file"], ann(out)["trained"]])


def test_half_deleted_store_is_compacted_and_still_searched_right(tmp_path, model_dir):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 30)
    build_index(root, out, model_dir, approx_threshold=100, from_embeddings=str(shards))
    before = {r[:3]: r[3] for r in rows(out)}
    for i in range(0, 30, 3):
        for j in (i, i + 1):
            (root / f"f{j:05d}.mp4").unlink()
    build_index(root, out, model_dir, approx_threshold=100)
    assert [p.name for p in out.glob("embeddings-*.f32")] == ["embeddings-1.f32"]  # the next epoch, alone
    after = rows(out)
    assert len(after) == 10 * PER_FILE
    for p, a, b, emb in after:
        np.testing.assert_array_equal(emb, before[p, a, b])
    check_search(out)


# ---------------------------------------------------------------------------------------------- SIGKILL
KILLED_RUN = """
import os, signal, sys
from stanvid.search.index import build_index, imports, maintain, vectors

point = sys.argv[4]
calls = {"n": 0}
imports.COMMIT_ROWS = 100  # many commits

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "append":  # rows written to the store, their transaction not committed
    append = vectors.VectorStore.append
    def killing_append(self, v):
        calls["n"] += 1
        found = append(self, v)
        if calls["n"] == 3:
            die()
        return found
    vectors.VectorStore.append = killing_append
if point == "vectors":  # a new vector index file renamed into place, not yet recorded
    write = maintain._write
    def killing_write(index, path):
        found = write(index, path)
        if path.name.startswith("vectors-"):
            die()
        return found
    maintain._write = killing_write

def on_commit(n):
    if point == "commit" and n >= 3:
        die()

build_index(sys.argv[1], sys.argv[2], sys.argv[3], segment_seconds=1.0, num_workers=0, progress=False,
            approx_threshold=100, from_embeddings=sys.argv[5], on_commit=on_commit)
"""


@pytest.mark.parametrize("point", ["commit", "append", "vectors"])
def test_a_run_killed_at_any_point_opens_answers_and_is_finished_by_the_next(tmp_path, model_dir, point):
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 30)
    build_index(root, out, model_dir, approx_threshold=100, from_embeddings=str(shards))
    add_files(root, shards, 30, 20)  # the killed run adds these (past 10 %: it would merge)
    reference = tmp_path / "reference"
    build_index(root, reference, model_dir, approx_threshold=100, from_embeddings=str(shards))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(root), str(out), str(model_dir), point,
                           str(shards)], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    partial = rows(out)
    per_file: dict[str, int] = {}
    for p, *_ in partial:
        per_file[p] = per_file.get(p, 0) + 1
    assert set(per_file.values()) == {PER_FILE}  # whole files only
    assert len(set((p, a) for p, a, *_ in partial)) == len(partial)  # nothing twice
    check_search(out, min_recall=0.75)  # opens and answers from what was committed (an unmerged delta)
    build_index(root, out, model_dir, approx_threshold=100, from_embeddings=str(shards))  # finishes
    final, expected = rows(out), rows(reference)
    assert [r[:3] for r in final] == [r[:3] for r in expected]
    for r, ref in zip(final, expected, strict=True):
        np.testing.assert_array_equal(r[3], ref[3])
    check_search(out)
    recorded = ann(out)
    assert sorted(p.name for p in out.glob("*.faiss")) == sorted([recorded["file"], recorded["trained"]])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_large_index_finds_its_cells_in_two_levels(tmp_path, model_dir):
    """From 1024 cells the centroids are trained and found in two levels (an inverted file over them)."""
    root, shards, out = tmp_path / "videos", tmp_path / "emb", tmp_path / "idx"
    add_files(root, shards, 0, 1000)  # 20,000 vectors
    build_index(root, out, model_dir, approx_threshold=100, nlist=1024, from_embeddings=str(shards))
    recorded = ann(out)
    assert recorded["two_level"] and recorded["nlist"] == 1024 and recorded["recall_at_10"] >= 0.95
    check_search(out)

"""Copies (issue 35): `find_duplicates` / `stanvid duplicates` group the files that hold the same footage and
say which spans match, on an imported archive whose copies are known by construction (a file's vectors with
noise, trimmed at the start or the end), through every bucketing path (all pairs, the index's own cells, a
k-means of an exact index's vectors); `find_copies` agrees for one file."""

from __future__ import annotations

import csv
import functools
import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("faiss")

from indexkit import DIM, index_model, save_tiny_model, write_shard  # noqa: E402
from stanvid.cli import main as cli_main  # noqa: E402
from stanvid.errors import QueryError  # noqa: E402
from stanvid.search import duplicates as dup  # noqa: E402
from stanvid.search.index import build_index as _build_index  # noqa: E402
from stanvid.search.index import open_index  # noqa: E402

build_index = functools.partial(_build_index, num_workers=0, progress=False, segment_seconds=1.0)

ORIGINALS, LENGTH = 40, 20


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module", params=["ivfpq", "flat"])
def archive(request, tmp_path_factory):
    """40 originals of 20 one-second segments (topics shared, so unrelated files are alike too); originals 0-9
    have a re-encoded copy (same times, noise) and a trimmed one (its segments 6-19, noise); original 0 a
    copy of the copy. Returns (index dir, {copy group as a frozenset of paths})."""
    tmp = tmp_path_factory.mktemp(f"dup-{request.param}")
    root = tmp / "videos"
    rng = np.random.default_rng(0)
    topics = rng.standard_normal((4, DIM))
    originals = [_unit(topics[i % 4] + 0.7 * rng.standard_normal(DIM) + 0.5 * rng.standard_normal((LENGTH, DIM)))
                 for i in range(ORIGINALS)]  # fmt: skip
    files: dict[str, np.ndarray] = {f"orig/{i:03d}.mp4": v for i, v in enumerate(originals)}
    groups = []
    for i in range(10):
        files[f"copies/{i:03d}-reencoded.mp4"] = _unit(
            originals[i] + 0.06 * rng.standard_normal((LENGTH, DIM))
        )
        files[f"copies/{i:03d}-trimmed.mp4"] = _unit(originals[i][6:] + 0.06 * rng.standard_normal((14, DIM)))
        groups.append({f"orig/{i:03d}.mp4", f"copies/{i:03d}-reencoded.mp4", f"copies/{i:03d}-trimmed.mp4"})
    files["copies/000-copy-of-copy.mp4"] = _unit(
        files["copies/000-trimmed.mp4"][:10] + 0.04 * rng.standard_normal((10, DIM))
    )
    groups[0].add("copies/000-copy-of-copy.mp4")
    listing = []
    for n, rel in enumerate(files):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(n.to_bytes(4, "little"))
        listing.append((rel, path.stat().st_size, os.stat(path).st_mtime_ns))
    write_shard(tmp / "emb" / "part.json", listing, np.concatenate(list(files.values())),
                segments=[len(v) for v in files.values()])  # fmt: skip
    model_dir = save_tiny_model(tmp / "model")
    threshold = 100 if request.param == "ivfpq" else 10**6
    build_index(root, tmp / "idx", model_dir, approx_threshold=threshold, from_embeddings=str(tmp / "emb"))
    return tmp / "idx", {frozenset(g) for g in groups}


@pytest.mark.parametrize("bucketed", [False, True])
def test_copy_groups_are_the_copies_made(archive, bucketed, monkeypatch):
    out, truth = archive
    if bucketed:  # the index's cells (IVF-PQ) or a k-means of its vectors (exact), not all pairs
        monkeypatch.setattr(dup, "BRUTE_ROWS", 0)
    with open_index(out, model=index_model()) as index:
        groups = index.duplicates()
    assert {frozenset(g.files) for g in groups} == truth
    pairs = {(m.a, m.b): m for g in groups for m in g.pairs}
    trimmed = pairs["copies/003-trimmed.mp4", "orig/003.mp4"]  # a < b by path
    assert (trimmed.a_start, trimmed.a_end, trimmed.b_start, trimmed.b_end) == (0.0, 14.0, 6.0, 20.0)
    assert trimmed.shift == 6.0 and trimmed.segments == 14 and trimmed.score > 0.9
    same = pairs["copies/003-reencoded.mp4", "orig/003.mp4"]
    assert (same.a_start, same.a_end, same.shift, same.segments) == (0.0, 20.0, 0.0, 20)


def test_copies_of_one_file(archive):
    out, _ = archive
    with open_index(out, model=index_model()) as index:
        fid = next(h.file_id for h in index.search_embeddings(index.segment_embeddings([1]), 1)[0])
        path = index.file_relpath(fid)
        matches = index.copies(fid)
        whole = {frozenset(g.files) for g in index.duplicates()}
        group = next((g for g in whole if path in g), frozenset({path}))
        assert {m.b for m in matches} | {path} == group
        assert all(m.a == path and m.a_file_id == fid for m in matches)
        with pytest.raises(QueryError, match="no file with id"):
            index.copies(10**9)
        with pytest.raises(QueryError, match="threshold must be"):
            index.duplicates(threshold=1.5)


def test_cli_duplicates_json_and_csv(archive, capsys):
    out, truth = archive
    assert cli_main(["duplicates", str(out), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert {frozenset(g["files"]) for g in groups} == truth
    assert cli_main(["duplicates", str(out), "--csv", "--threshold", "0.9"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == sum(len(g["pairs"]) for g in groups) and {"a", "b_start", "shift"} <= set(table[0])
    assert cli_main(["duplicates", str(out)]) == 0
    assert capsys.readouterr().out.startswith("group 1: 4 files")
    assert cli_main(["duplicates", str(out), "--threshold", "2"]) == 2
    assert "threshold must be" in capsys.readouterr().err


def test_api_copies_of_a_file_and_the_page_offers_them(archive):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from stanvid.search.server.app import create_app

    out, truth = archive
    with open_index(out, model=index_model()) as index:
        fid = next(f for f in range(1, 100) if index.file_relpath(f) == "orig/000.mp4")
        expected = index.copies(fid)
    with TestClient(
        create_app(out, model=index_model(), follow=None), raise_server_exceptions=False
    ) as client:
        body = client.get(f"/api/copies/{fid}").json()
        assert body["path"] == "orig/000.mp4"
        assert [c["path"] for c in body["copies"]] == [m.b for m in expected]
        assert {c["path"] for c in body["copies"]} | {"orig/000.mp4"} in [set(g) for g in truth]
        trimmed = next(c for c in body["copies"] if c["path"] == "copies/000-trimmed.mp4")
        assert (trimmed["start"], trimmed["end"], trimmed["source_start"], trimmed["source_end"]) == (
            0,
            14,
            6,
            20,
        )
        assert client.get("/api/copies/999999").status_code == 404
        assert client.get(f"/api/copies/{fid}", params={"threshold": 2}).status_code == 400
        script = client.get("/static/app.js").text
        assert (
            "/api/copies/" in script and "offset=" in script and 'id="more-results"' in client.get("/").text
        )

"""Search with a Mug-STAN model: `stanvid index` keeps per-frame vectors, `search` re-ranks with the Mug head.

Checked against a second path: frames decoded and encoded directly (`reference_frames`), the head applied by
brute force over every segment (the test index is smaller than the re-rank's candidate count).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("faiss")

import stanvid  # noqa: E402
from stanvid.search.index import DB_NAME, SHARD_DIR  # noqa: E402
from stanvid.search.index import build_index as _build_index
from stanvid.search.index import open_index as _open_index
from stanvid.search.index import search_index as _search_index

# the references below are float32 computations: index and query in float32 (`stanvid.precision`)
build_index = functools.partial(_build_index, precision="fp32")
open_index = functools.partial(_open_index, precision="fp32")
search_index = functools.partial(_search_index, precision="fp32")
from indexkit import VIDEOS, index_model, make_folder  # noqa: E402
from indexkit import rows as store_rows  # noqa: E402
from stanvid.models.mug import mug_similarity  # noqa: E402
from stanvid.models.tokenizer import tokenize  # noqa: E402
from stanvid.video.sampling import uniform_indices  # noqa: E402
from stanvid.video.transforms import EvalTransform  # noqa: E402


def mug_model_dir(directory):
    model = index_model(seed=5)
    model.config.similarity = "mug"
    model.save_pretrained(directory)
    return directory


def stored(index_dir):
    """(segment id, relpath, start, pooled embedding, per-frame vectors or None) of every segment, by path."""
    with contextlib.closing(sqlite3.connect(index_dir / DB_NAME)) as conn:
        found = conn.execute(
            "SELECT s.id, f.path, s.start, sf.frames FROM segments s JOIN files f ON f.id = s.file_id "
            "LEFT JOIN segment_frames sf ON sf.segment_id = s.id"
        ).fetchall()
    pooled = {(p, a): e for p, a, _, e in store_rows(index_dir)}  # the store, read directly
    return sorted(
        (sid, p, a, pooled[p, a], None if fr is None else np.frombuffer(fr, np.float32))
        for sid, p, a, fr in found
    )


def reference_frames(model, path, start, end) -> np.ndarray:
    info = stanvid.probe(path)
    first = math.ceil(start * info.fps - 1e-6)
    last = min(info.num_frames, math.ceil(end * info.fps - 1e-6)) - 1
    idx = first + uniform_indices(last - first + 1, model.config.num_frames)
    size = model.config.clip.vision.image_size
    clip = EvalTransform(size)(stanvid.read_frames(path, idx, size=size))
    with torch.no_grad():
        return model.encode_video(clip[None], pool=False)[0].numpy()  # (T, D)


@pytest.fixture(scope="module")
def mug_built(tmp_path_factory):
    model_dir = mug_model_dir(tmp_path_factory.mktemp("mugmodel") / "tiny")
    root = make_folder(tmp_path_factory.mktemp("videos"))
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(root, out, model_dir, segment_seconds=1.0, batch_size=3, num_workers=0, progress=False)
    return root, out, model_dir


def test_index_keeps_per_frame_vectors(mug_built):
    root, out, model_dir = mug_built
    model = stanvid.load_model(model_dir)
    assert model.config.similarity == "mug"
    rows = stored(out)
    assert rows and all(frames is not None for *_, frames in rows)
    for sid, path, start, emb, frames in rows:
        frames = frames.reshape(model.config.num_frames, -1)
        seg = open_index(out).segment(sid)
        np.testing.assert_allclose(frames, reference_frames(model, root / path, start, seg.end), atol=2e-5)
        pooled = F.normalize(torch.from_numpy(frames.copy()).mean(0), dim=-1).numpy()
        np.testing.assert_allclose(emb, pooled, atol=1e-6)  # FAISS holds the pooled, normalized frames


def test_search_reranks_with_the_head_like_brute_force(mug_built):
    _, out, model_dir = mug_built
    model = stanvid.load_model(model_dir)
    rows = stored(out)
    frames = torch.from_numpy(np.stack([f for *_, f in rows])).view(len(rows), model.config.num_frames, -1)
    for text in ("a dog catches a frisbee", "someone cooking pasta"):
        ids = tokenize([text], context_length=16)
        with torch.no_grad():
            tokens = model.encode_text(ids, pool=False)
        scores = mug_similarity(tokens, ids != 0, frames)[0].numpy()
        order = np.argsort(-scores, kind="stable")[:5]
        hits = search_index(out, text, k=5)
        assert [h.id for h in hits] == [rows[i][0] for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)


def test_the_cli_query_path_and_the_server_rerank_too(mug_built):
    """`stanvid search` and `/api/search` go through `stanvid.search.query.search`: a text query is re-ranked
    by the head there as well (the same hits and scores as `VideoIndex.search`); a query with an image or an
    example clip in it is one pooled vector."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from stanvid.search.query import Query
    from stanvid.search.query import search as query_search
    from stanvid.search.server.app import create_app

    _, out, _ = mug_built
    text = "a dog catches a frisbee"
    with open_index(out) as index:
        expected = index.search(text, 5)
        assert query_search(index, text, 5) == expected
        assert query_search(index, Query(text=text, like=expected[0].id, like_weight=0.0), 5) == expected
        pooled = index.search_embeddings(index.embed_text([text]), 5)[0]
        assert [h.score for h in pooled] != [h.score for h in expected]  # the head's scores differ
    with TestClient(create_app(out, precision="fp32")) as client:
        body = client.get("/api/search", params={"q": text, "k": 5}).json()
    assert [r["id"] for r in body["results"]] == [h.id for h in expected]
    np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in expected], atol=1e-6)


def test_deleted_files_take_their_frame_vectors_along(tmp_path):
    model_dir = mug_model_dir(tmp_path / "m")
    root = make_folder(tmp_path / "videos", {k: v for k, v in VIDEOS.items() if k != "d.webm"})
    out = tmp_path / "idx"
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    os.remove(root / "a.mp4")
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:
        segments = conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
        frames = conn.execute("SELECT COUNT(*) FROM segment_frames").fetchone()[0]
        orphans = conn.execute(
            "SELECT COUNT(*) FROM segment_frames WHERE segment_id NOT IN (SELECT id FROM segments)"
        ).fetchone()[0]
    assert segments == frames > 0 and orphans == 0


def test_a_cosine_index_stores_no_frames(tmp_path):
    index_model().save_pretrained(tmp_path / "m")
    root = make_folder(tmp_path / "videos", {"a.mp4": VIDEOS["a.mp4"]})
    build_index(root, tmp_path / "idx", tmp_path / "m", num_workers=0, progress=False)
    assert all(frames is None for *_, frames in stored(tmp_path / "idx"))


def test_merged_shards_keep_their_frame_vectors(tmp_path, mug_built):
    root, complete, model_dir = mug_built
    out = tmp_path / "idx"
    (out / SHARD_DIR).mkdir(parents=True)
    # a rank's shard has the main index's schema: a finished single-process index stands in for one
    shutil.copy(complete / DB_NAME, out / SHARD_DIR / "rank-00001.sqlite")
    for store in complete.glob("embeddings-*.f32"):  # and its store, under the name its record gives
        shutil.copy(store, out / SHARD_DIR / store.name)
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    assert not (out / SHARD_DIR).exists()
    merged, reference = stored(out), stored(complete)
    assert len(merged) == len(reference)
    for (_, p, a, e, f), (_, rp, ra, re_, rf) in zip(merged, reference, strict=True):
        assert (p, a) == (rp, ra)
        np.testing.assert_array_equal(e, re_)
        np.testing.assert_array_equal(f, rf)

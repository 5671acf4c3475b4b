"""The HTTP routes beyond text: image upload, "more like this" by segment id, results grouped per file. Each
answer equals the library's (`stanvid.search.query`); every bad request is a 4xx with a JSON message."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from indexkit import make_folder, save_tiny_model  # noqa: E402
from stanvid.search.index import build_index, open_index  # noqa: E402
from stanvid.search.query import Query, search  # noqa: E402
from stanvid.search.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("served-query")
    model_dir = save_tiny_model(base / "model")
    root = make_folder(base / "videos")
    out = base / "idx"
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    app = create_app(out, max_image_bytes=200_000)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, out


def png(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_image_search_equals_the_library(served):
    client, out = served
    data = png()
    r = client.post("/api/search/image", params={"k": 4}, content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    with open_index(out) as index:
        expected = index.search_image(data, 4)
    assert [h["id"] for h in body["results"]] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in body["results"]], [h.score for h in expected], atol=1e-5)
    hit = body["results"][0]
    assert hit["like_url"] == f"/api/like/{hit['id']}"
    assert hit["play_url"] == f"/api/video/{hit['file_id']}#t={hit['start']:.3f}"
    # text and image together, weighted
    r = client.post(
        "/api/search/image",
        params={"k": 3, "q": "at night", "text_weight": "0.5"},
        content=data,
        headers={"content-type": "image/png"},
    )
    with open_index(out) as index:
        expected = search(index, Query(text="at night", image=data, text_weight=0.5), 3)
    assert [h["id"] for h in r.json()["results"]] == [h.id for h in expected]


def test_more_like_this_and_grouping(served):
    client, out = served
    r = client.get("/api/like/2", params={"k": 3})
    assert r.status_code == 200
    ids = [h["id"] for h in r.json()["results"]]
    assert ids[0] == 2 and r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    r = client.get("/api/like/2", params={"k": 2, "group": "file"})
    body = r.json()
    assert body["group"] == "file" and len({h["file_id"] for h in body["results"]}) == 2
    assert all(len(h["timeline"]) >= 1 for h in body["results"])
    r = client.get("/api/search", params={"q": "a beach", "k": 3, "group": "file"})
    with open_index(out) as index:
        expected = search(index, "a beach", 3, group_by="file")
    got = r.json()["results"]
    assert [h["id"] for h in got] == [g.best.id for g in expected]
    assert [[t["id"] for t in h["timeline"]] for h in got] == [
        [t["id"] for t in g.timeline] for g in expected
    ]


@pytest.mark.parametrize(
    "request_args, status, message",
    [
        (("post", "/api/search/image", b"junk", "image/png", {}), 400, "not an image"),
        (("post", "/api/search/image", b"", "image/png", {}), 400, "empty"),
        (("post", "/api/search/image", b"x", "text/plain", {}), 415, "Content-Type image/*"),
        (("post", "/api/search/image", b"x" * 300_000, "image/png", {}), 413, "at most 200000"),
        (("post", "/api/search/image", "png", "image/png", {"k": "0"}), 400, "k must be between"),
        (("post", "/api/search/image", "png", "image/png", {"image_weight": "-2"}), 400, "image_weight"),
        (("post", "/api/search/image", "png", "image/png", {"image_weight": "0"}), 400, "weight 0"),
        (("post", "/api/search/image", "png", "image/png", {"q": "x" * 600}), 400, "at most"),
        (("get", "/api/like/999999", None, None, {}), 404, "no segment with id 999999"),
        (("get", "/api/like/-1", None, None, {}), 400, "segment id"),
        (("get", "/api/like/1", None, None, {"like_weight": "lots"}), 400, "like_weight must be a number"),
        (("get", "/api/like/1", None, None, {"like_weight": "inf"}), 400, "finite"),
        (("get", "/api/like/1", None, None, {"group": "folder"}), 400, "group must be"),
        (("get", "/api/search", None, None, {"q": "x", "group": "folder"}), 400, "group must be"),
        (("get", "/api/search/image", None, None, {}), 405, "Method Not Allowed"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(served, request_args, status, message):
    client, _ = served
    method, url, body, kind, params = request_args
    if body == "png":
        body = png()
    headers = {"content-type": kind} if kind else {}
    r = client.request(method.upper(), url, params=params, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_a_decompression_bomb_is_refused(served):
    client, _ = served
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 100 M pixels in a few kB
    data = buf.getvalue()
    assert len(data) < 200_000
    r = client.post("/api/search/image", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 400 and "pixels" in r.json()["error"]

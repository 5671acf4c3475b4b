"""The HTTP API (FastAPI test client): search equals the library, thumbnails are the segment's middle frame,
video streaming honours ranges byte for byte, and every bad request is a 4xx with a JSON message."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import stanvid  # noqa: E402
from indexkit import VIDEOS, index_model, make_folder, save_tiny_model  # noqa: E402
from stanvid.search.index import VideoIndexError, build_index, open_index  # noqa: E402
from stanvid.search.server.app import MAX_K, MAX_QUERY_CHARS, create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    model_dir = save_tiny_model(base / "model")
    root = make_folder(base / "videos")
    out = base / "idx"
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    app = create_app(out)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, root, out


def test_search_returns_the_library_ranking(served):
    client, root, out = served
    r = client.get("/api/search", params={"q": "a dog on a beach", "k": 5})
    assert r.status_code == 200
    body = r.json()
    expected = open_index(out).search("a dog on a beach", 5)
    assert body["query"] == "a dog on a beach" and body["k"] == 5
    assert [h["id"] for h in body["results"]] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in body["results"]], [h.score for h in expected], atol=1e-6)
    for hit, ref in zip(body["results"], expected, strict=True):
        assert hit["path"] == ref.relpath and str(root) not in hit["path"]  # no server paths leak out
        assert (hit["start"], hit["end"]) == (ref.start, ref.end)
        assert hit["thumbnail_url"] == f"/api/thumbnail/{ref.id}"
        assert hit["video_url"] == f"/api/video/{ref.file_id}"
    assert client.get("/api/search", params={"q": "x"}).json()["k"] == 10  # default k


def test_info_and_page(served):
    client, _, _ = served
    info = client.get("/api/info").json()
    assert info["files"] == len(VIDEOS) and info["segment_seconds"] == 1.0
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_thumbnail_is_the_middle_frame(served):
    client, _, out = served
    index = open_index(out)
    hit = index.search("x", 1)[0]
    r = client.get(f"/api/thumbnail/{hit.id}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    image = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(np.float32)
    info = stanvid.probe(hit.path)
    middle = int((hit.start + hit.end) / 2 * info.fps)
    frames = stanvid.read_frames(hit.path, [middle - 1, middle, middle + 1]).numpy().astype(np.float32)
    errors = [np.abs(image - f).mean() for f in frames]
    assert image.shape == frames[1].shape
    assert (
        np.argmin(errors) == 1 and errors[1] < 6
    )  # JPEG-close to its own frame, farther from the neighbours


@pytest.mark.parametrize(
    "header, first, last",
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, None),
        ("bytes=-50", -50, None),
        ("bytes=10-10", 10, 10),
        ("bytes=0-99999999", 0, None),
    ],
)
def test_video_ranges_are_byte_exact(served, header, first, last):
    client, _, out = served
    hit = open_index(out).search("x", 1)[0]
    data = open(hit.path, "rb").read()
    r = client.get(f"/api/video/{hit.file_id}", headers={"Range": header})
    assert r.status_code == 206
    start = first % len(data)
    end = len(data) - 1 if last is None else last
    assert r.content == data[start : end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
    assert int(r.headers["content-length"]) == end - start + 1
    assert r.headers["accept-ranges"] == "bytes"


def test_whole_video(served):
    client, _, out = served
    hit = open_index(out).search("x", 1)[0]
    r = client.get(f"/api/video/{hit.file_id}")
    assert r.status_code == 200 and r.content == open(hit.path, "rb").read()
    assert r.headers["content-type"].startswith("video/")


@pytest.mark.parametrize(
    "header",
    ["bytes=999999999-", "bytes=50-10", "bytes=0-1,5-9", "items=0-5", "bytes=-0", "bytes=-", "bytes=a-b"],
)
def test_bad_ranges_are_416(served, header):
    client, _, out = served
    hit = open_index(out).search("x", 1)[0]
    size = len(open(hit.path, "rb").read())
    r = client.get(f"/api/video/{hit.file_id}", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{size}"
    assert r.json()["error"]


@pytest.mark.parametrize(
    "url, status",
    [
        ("/api/search", 400),
        ("/api/search?q=", 400),
        ("/api/search?q=%20%20", 400),
        (f"/api/search?q={'a' * (MAX_QUERY_CHARS + 1)}", 400),
        ("/api/search?q=x&k=0", 400),
        ("/api/search?q=x&k=-3", 400),
        ("/api/search?q=x&k=ten", 400),
        ("/api/search?q=x&k=2.5", 400),
        (f"/api/search?q=x&k={MAX_K + 1}", 400),
        ("/api/search?q=x&k=99999999999999999999999", 400),
        ("/api/thumbnail/999999", 404),
        ("/api/thumbnail/abc", 400),
        ("/api/video/999999", 404),
        ("/api/video/-1", 400),
        ("/api/video/1.5", 400),
        ("/api/video/..%2F..%2Fetc%2Fpasswd", 404),  # decoded to a path no route matches
        ("/api/video/%2e%2e", 400),
        ("/api/nothing", 404),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(served, url, status):
    client, _, _ = served
    r = client.get(url)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_only_indexed_files_can_be_served(served):
    client, root, out = served
    with open_index(out) as index:
        served_paths = {str(index.file_path(i)) for i in range(1, 100) if index.file_path(i) is not None}
    assert str(root / "broken.mp4") not in served_paths and str(root / "notes.txt") not in served_paths
    assert served_paths == {str(root / name) for name in VIDEOS}
    assert client.get("/api/video/../../broken.mp4").status_code == 404  # not an API route at all
    assert client.get("/static/../../index.py").status_code == 404


def test_a_file_removed_after_indexing_is_a_404_not_a_500(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    root = make_folder(tmp_path / "videos")
    build_index(root, tmp_path / "idx", model_dir, num_workers=0, progress=False)
    client = TestClient(create_app(tmp_path / "idx"), raise_server_exceptions=False)
    hit = client.get("/api/search", params={"q": "x", "k": 1}).json()["results"][0]
    shutil.move(root / hit["path"], tmp_path / "gone.mp4")
    for url in (hit["thumbnail_url"], hit["video_url"]):
        r = client.get(url)
        assert r.status_code == 404 and r.json()["error"]


def test_the_app_refuses_a_different_model(served):
    _, _, out = served
    with pytest.raises(VideoIndexError, match="not the model"):
        create_app(out, model=index_model(seed=5))

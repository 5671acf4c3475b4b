"""What a newcomer met on a fresh install, each as the command they ran: a typo in a local model path, a bad or
busy port for `serve`, `index` of a folder without videos, and `/api/info`'s name of the model."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import stanvid
from indexkit import make_folder, save_tiny_model
from stanvid.cli import main as cli_main
from stanvid.errors import CheckpointError
from testkit import one_line_error


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything reaches for the hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr("stanvid.checkpoints.load.download_hub", refuse)


@pytest.mark.parametrize(
    "typo",
    ["./stanvid-demo/modle", "/nowhere/model", "~/no-such-model-folder", "a/b/c", "stanvid-demo/modle"],
)
def test_a_mistyped_local_path_is_no_such_folder_at_once(tmp_path, monkeypatch, no_hub, typo):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stanvid-demo").mkdir()  # the parent exists: `stanvid-demo/modle` is a local path
    with pytest.raises(CheckpointError, match="no such file or directory"):
        stanvid.load_model(typo)


def test_a_hub_id_is_still_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []

    def fake_download(repo, **kwargs):
        asked.append(repo)
        raise CheckpointError(f"{repo}: offline")

    monkeypatch.setattr("stanvid.checkpoints.load.download_hub", fake_download)
    with pytest.raises(CheckpointError, match="offline"):
        stanvid.load_model("owner/model-name")
    assert asked == ["owner/model-name"]


def test_a_home_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_tiny_model(tmp_path / "mine")
    assert stanvid.load_model("~/mine").config.num_frames == 4


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    pytest.importorskip("faiss")
    base = tmp_path_factory.mktemp("newcomer")
    model = save_tiny_model(base / "stanvid-demo" / "model")
    root = make_folder(base / "videos", {"a.mp4": (12, 1, "h264")})
    out = base / "idx"
    stanvid.build_index(root, out, model, num_workers=0, progress=False)
    return model, out


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_inone_line_error(capsys, small_index, port):
    pytest.importorskip("uvicorn")
    one_line_error(capsys, ["serve", str(small_index[1]), "--port", port], "--port", port)


def test_serve_on_a_busy_port_says_so_inone_line_error(capsys, small_index):
    pytest.importorskip("uvicorn")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        err = one_line_error(capsys, ["serve", str(small_index[1]), "--port", str(port)], str(port), "in use")
    assert "serving" not in capsys.readouterr().out + err


def test_index_of_a_folder_without_videos_is_an_error_and_writes_nothing(capsys, tmp_path, small_index):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a video")
    out = tmp_path / "idx"
    one_line_error(
        capsys, ["index", str(empty), "--model", str(small_index[0]), "--out", str(out)], "no videos"
    )
    assert not out.exists()


def test_an_index_whose_folder_emptied_says_so(capsys, tmp_path, small_index):
    pytest.importorskip("faiss")
    root = make_folder(tmp_path / "videos", {"a.mp4": (12, 1, "h264")})
    out = tmp_path / "idx"
    model = str(small_index[0])
    assert cli_main(["index", str(root), "--model", model, "--out", str(out), "--no-progress"]) == 0
    for video in root.glob("*.mp4"):
        video.unlink()
    capsys.readouterr()
    assert cli_main(["index", str(root), "--model", model, "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "holds no videos now" in said and "0 videos" in said


def test_api_info_names_the_model_by_more_than_its_last_folder(small_index):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    model, out = small_index
    with TestClient(stanvid.create_app(out)) as client:
        name = client.get("/api/info").json()["model"]
    assert name == "stanvid-demo/model"
    assert not Path(name).is_absolute() and str(model.parent.parent) not in name  # no machine path leaves

"""One definition per mechanism (issue 15): the video extensions, the DataLoader, atomic writes, rank lookups.

A `.m4v` file (MPEG-4 under Apple's extension) once was a video to the datasets but not to the index: the
extension lists had drifted apart. Here one such file goes through every path that finds videos (index,
prepare-videos, the server, the dataset finder), and the source is checked for hand-made copies of the
mechanisms that now live in one module each.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from indexkit import save_tiny_model, write_clip  # noqa: E402
from stanvid import data  # noqa: E402
from stanvid.data import VideoFinder  # noqa: E402
from stanvid.data.loader import build_loader  # noqa: E402
from stanvid.search import index  # noqa: E402
from stanvid.search.index import build_index, open_index  # noqa: E402
from stanvid.search.server.app import create_app  # noqa: E402
from stanvid.video import decode as video_io  # noqa: E402
from stanvid.video import folders, prepare  # noqa: E402
from stanvid.video.prepare import prepare_videos  # noqa: E402

PACKAGE = Path(data.__file__).parents[1]  # src/stanvid


@pytest.fixture(scope="module")
def m4v_folder(tmp_path_factory) -> Path:
    """A folder with one MPEG-4 file named `.m4v` (written as .mp4, then renamed: the container is mp4)."""
    root = tmp_path_factory.mktemp("m4v") / "videos"
    write_clip(root / "clip.mp4", frames=20, seed=5).rename(root / "clip.m4v")
    return root


def test_every_place_that_finds_videos_uses_the_one_list(m4v_folder):
    assert data.VIDEO_EXTENSIONS is video_io.VIDEO_EXTENSIONS
    assert index.VIDEO_EXTENSIONS is video_io.VIDEO_EXTENSIONS
    assert set(video_io.VIDEO_EXTENSIONS) == set(video_io.VIDEO_MEDIA_TYPES)
    assert all(ext == ext.lower() and ext.startswith(".") for ext in video_io.VIDEO_EXTENSIONS)
    assert all(t.startswith("video/") for t in video_io.VIDEO_MEDIA_TYPES.values())  # none falls back
    assert index.find_videos is folders.find_videos  # index, embed, classify and prepare-videos walk alike
    assert folders.find_videos(m4v_folder) == [m4v_folder / "clip.m4v"]
    assert not hasattr(prepare, "find_videos")
    assert VideoFinder(m4v_folder).find("clip") == m4v_folder / "clip.m4v"


def test_an_m4v_file_is_indexed_and_served_as_video(m4v_folder, tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "idx"
    report = build_index(m4v_folder, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    assert (report.files, report.failed) == (1, [])
    hit = open_index(out).search("a clip", 1)[0]
    assert hit.relpath == "clip.m4v"
    with TestClient(create_app(out), raise_server_exceptions=False) as client:
        r = client.get(f"/api/video/{hit.file_id}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "video/mp4"
    assert r.content == (m4v_folder / "clip.m4v").read_bytes()


def test_an_m4v_file_is_prepared(m4v_folder, tmp_path):
    dst = tmp_path / "prepared"
    report = prepare_videos(m4v_folder, dst, fps=5, short_side=32, workers=1, progress=False)
    assert (report.converted, report.failed) == (["clip.m4v"], [])
    assert video_io.probe(dst / "clip.mp4").num_frames == 10  # 2 s at 5 fps
    assert sorted(p.name for p in dst.iterdir()) == [prepare.MANIFEST, "clip.mp4"]  # no temporary file left


def test_build_loader_serves_every_loop():
    """Training reseeds its own generator and orders items with its own sampler; indexing reads whole batches
    from an iterable dataset; both go through the one builder."""
    items = [{"x": torch.tensor(i)} for i in range(6)]
    generator = torch.Generator()
    train_like = build_loader(
        items, 2, sampler=list(range(5, -1, -1)), seed=generator, drop_last=True, pin_memory=False
    )
    assert train_like.generator is generator
    assert [b["x"].tolist() for b in train_like] == [[5, 4], [3, 2], [1, 0]]
    whole = build_loader(items, None, collate_fn=lambda item: item, pin_memory=False)
    assert next(iter(whole)) == items[0]
    first = [b["x"].tolist() for b in build_loader(items, 3, shuffle=True, seed=7, pin_memory=False)]
    again = [b["x"].tolist() for b in build_loader(items, 3, shuffle=True, seed=7, pin_memory=False)]
    assert first == again and sorted(sum(first, [])) == list(range(6))
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(items, 0)


def _calls(tree: ast.AST) -> list[str]:
    """Every called name, dotted as written: `os.replace`, `DataLoader`, `dist.get_world_size`."""
    return [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]


@pytest.mark.parametrize(
    ("calls", "home"),
    [
        ({"os.replace", "os.rename"}, "fileio.py"),
        ({"DataLoader", "torch.utils.data.DataLoader"}, "data/loader.py"),
        ({"dist.get_world_size", "dist.get_rank"}, "distributed.py"),
    ],
)
def test_each_mechanism_is_called_in_its_one_module_only(calls, home):
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE).as_posix()
        if rel == home:
            continue
        found += [f"{rel}: {c}" for c in _calls(ast.parse(file.read_text())) if c in calls]
    assert not found, f"use {home}'s function instead of: {found}"


def test_index_and_prepare_walk_a_folder_alike(tmp_path):
    """Hidden names, links out of the folder and links inside it: index and prepare-videos take the same files
    and report the same refusals (one walk, `stanvid.video.folders.walk_videos`)."""
    root, outside = tmp_path / "videos", tmp_path / "elsewhere"
    write_clip(root / "a.mp4", frames=10, seed=1)
    write_clip(outside / "o.mp4", frames=10, seed=2)
    (root / "._a.mp4").write_bytes(b"macOS resource fork")  # hidden: not a video
    write_clip(root / ".cache" / "h.mp4", frames=10, seed=3)  # in a hidden folder
    os.symlink(outside / "o.mp4", root / "out.mp4")  # out of the folder: refused
    os.symlink(root / "a.mp4", root / "same.mp4")  # inside: followed
    skipped: list[tuple[str, str]] = []
    walked = [rel for rel, _ in folders.walk_videos(root, skipped=skipped)]
    assert walked == ["a.mp4", "same.mp4"]
    assert skipped == [("out.mp4", "a symbolic link to a file outside the folder (not followed)")]
    report = prepare_videos(root, tmp_path / "prepared", fps=2, short_side=None, workers=1, progress=False)
    assert sorted(report.converted) == walked
    assert report.failed == skipped
    model_dir = save_tiny_model(tmp_path / "model")
    built = build_index(root, tmp_path / "idx", model_dir, num_workers=0, progress=False)
    assert built.files == len(walked)
    assert built.failed == [
        (str(root / "out.mp4"), skipped[0][1].replace("the folder", "the indexed folder"))
    ]

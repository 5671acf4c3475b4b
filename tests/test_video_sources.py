"""Videos as people have them: phone videos with a display rotation (read upright everywhere, as ffmpeg shows
them), folders of frames (read as the video of their images), and videos held in memory (tar shard members).

Second paths: a twin file with the same stored frames and no rotation (rotated by hand), ffmpeg's own decode
(autorotation on, its default), frames written as lossless PNGs (the folder) and as a lossless video file."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import stanvid
from stanvid.data.base import VideoFinder
from stanvid.data.recognition import load_kinetics
from stanvid.data.retrieval import RetrievalDataset
from stanvid.data.retrieval_formats import load_video_captions
from stanvid.errors import VideoReadError
from stanvid.video.decode import MemoryVideo
from videogen import frame_code, make_frames, remux_rotated, write_video

UPRIGHT = make_frames(12, 48, 64, seed=3)  # (T, H, W, 3): what a viewer sees
ROTATIONS = (0, 90, 180, 270)


def stored_frames(degrees: int) -> np.ndarray:
    """What a camera stores for a video shown upright after a counter-clockwise rotation of `degrees`."""
    return np.ascontiguousarray(np.rot90(UPRIGHT, -(degrees // 90), axes=(1, 2)))


@pytest.fixture(scope="module")
def phone(tmp_path_factory) -> Path:
    """s{deg}.mp4: the frames stored sideways, no rotation; r{deg}.mp4: the same packets with a display rotation
    of deg (what the phone writes)."""
    root = tmp_path_factory.mktemp("phone")
    for deg in ROTATIONS:
        write_video(root / f"s{deg}.mp4", stored_frames(deg), fps=10, gop=4)
        remux_rotated(root / f"s{deg}.mp4", root / f"r{deg}.mp4", deg)
    return root


@pytest.mark.parametrize("deg", ROTATIONS)
def test_rotated_videos_are_probed_and_read_upright(phone, deg):
    info, twin = stanvid.probe(phone / f"r{deg}.mp4"), stanvid.probe(phone / f"s{deg}.mp4")
    assert (info.rotation, info.width, info.height, info.num_frames) == (deg, 64, 48, 12)
    assert twin.rotation == 0 and (twin.width, twin.height) == stored_frames(deg).shape[2:0:-1]
    turns = deg // 90
    for size in (None, 20):
        idx = [0, 7, 3, 3, 11]
        got = stanvid.read_frames(phone / f"r{deg}.mp4", idx, size=size).numpy()
        sideways = stanvid.read_frames(phone / f"s{deg}.mp4", idx, size=size).numpy()
        assert np.array_equal(got, np.rot90(sideways, turns, axes=(1, 2)))  # rotated after resizing
        assert min(got.shape[1:3]) == (size or 48)
    full = stanvid.read_frames(phone / f"r{deg}.mp4", range(12)).numpy()
    assert [frame_code(f) for f in full] == list(range(12))  # the code band is top left again: upright
    assert np.abs(full.astype(int) - UPRIGHT).mean() < 10  # x264's loss on a noisy texture; a wrong turn: ~50


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (the reference decoder)")
@pytest.mark.parametrize("deg", (90, 180, 270))
def test_rotation_matches_ffmpeg_default_autorotation(phone, deg):
    path = phone / f"r{deg}.mp4"
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    got = stanvid.read_frames(path, range(12)).numpy()
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(got.shape), got)


def test_datasets_index_thumbnails_and_prepare_see_rotated_videos_upright(phone, tmp_path):
    from indexkit import index_model

    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "upright.mp4", UPRIGHT, fps=10, gop=4)
    shutil.copy(phone / "r90.mp4", folder / "phone.mp4")
    shutil.copy(phone / "s90.mp4", folder / "sideways.mp4")
    (tmp_path / "c.csv").write_text("video,caption\nupright.mp4,a\nphone.mp4,b\nsideways.mp4,c\n")
    data = RetrievalDataset(load_video_captions(tmp_path / "c.csv", folder), num_frames=4, image_size=32)
    up, rotated, sideways = (data[i]["video"] for i in range(3))  # (T, 3, 32, 32) each
    assert (rotated - up).abs().mean() < 0.3 * (sideways - up).abs().mean()  # up to x264's loss

    report = stanvid.build_index(folder, tmp_path / "index", index_model(), progress=False)
    assert not report.failed
    with stanvid.open_index(tmp_path / "index") as index:
        segments = {Path(s.path).name: s for s in index.all_segments()[0]}
        assert (segments["phone.mp4"].width, segments["phone.mp4"].height) == (64, 48)
        thumb = index.middle_frame(segments["phone.mp4"].id).numpy()
        plain = index.middle_frame(segments["upright.mp4"].id).numpy()
    assert thumb.shape == plain.shape and frame_code(thumb) == frame_code(plain)
    assert np.abs(thumb.astype(int) - plain).mean() < 10

    prepared = stanvid.prepare_videos(
        folder, tmp_path / "prepared", fps=10, short_side=None, workers=1, progress=False
    )
    assert prepared.ok
    out = tmp_path / "prepared" / "phone.mp4"
    info = stanvid.probe(out)
    assert (info.rotation, info.width, info.height) == (
        0,
        64,
        48,
    )  # upright pixels, no rotation left to apply
    assert [frame_code(f) for f in stanvid.read_frames(out, range(12)).numpy()] == list(range(12))


# ---- frame folders -------------------------------------------------------------------------------------------

FRAMES = make_frames(15, 40, 56, seed=5)


def write_folder(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for name, frame in zip(names, FRAMES, strict=True):
        Image.fromarray(frame).save(folder / name)  # PNG: lossless
    return folder


def write_lossless(path: Path) -> Path:
    """The same frames as a lossless RGB video (FFV1): the file a frame folder must read exactly like."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 56, 40, "bgr0"
        for i, rgb in enumerate(FRAMES):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="bgr0")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def frame_dirs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frames")
    write_folder(root / "rawframes" / "cls" / "vid_a", [f"img_{i + 1:05d}.png" for i in range(15)])
    natural = write_folder(
        root / "rawframes" / "vid_b", [f"frame{i}.png" for i in range(15)]
    )  # frame10 > frame9
    (natural / "notes.txt").write_text("not a frame")
    Image.fromarray(FRAMES[0]).save(natural / ".hidden.png")
    write_lossless(root / "lossless.mkv")
    return root


def test_a_folder_of_images_is_read_as_its_frames_exactly(frame_dirs):
    for folder in (frame_dirs / "rawframes" / "cls" / "vid_a", frame_dirs / "rawframes" / "vid_b"):
        info = stanvid.probe(folder)
        assert (info.num_frames, info.width, info.height, info.fps, info.codec) == (
            15,
            56,
            40,
            30.0,
            "images",
        )
        assert stanvid.probe(folder, frame_rate=12.5).duration == pytest.approx(15 / 12.5)
        idx = [14, 0, 9, 10, 10, 2]
        assert np.array_equal(stanvid.read_frames(folder, idx).numpy(), FRAMES[idx])
        video = frame_dirs / "lossless.mkv"
        for size in (None, 24, 57):
            assert torch.equal(
                stanvid.read_frames(folder, idx, size=size), stanvid.read_frames(video, idx, size=size)
            )
    with pytest.raises(VideoReadError, match="frame index 15 out of range"):
        stanvid.read_frames(frame_dirs / "rawframes" / "vid_b", [15])


def test_datasets_sample_and_transform_a_frame_folder_as_the_same_file(frame_dirs, tmp_path):
    (tmp_path / "c.csv").write_text(
        "video,caption\nvid_a,folder of frames\nlossless.mkv,the same as a file\n"
    )
    ann = load_video_captions(tmp_path / "c.csv", frame_dirs)
    assert ann.video_paths[0] == str(frame_dirs / "rawframes" / "cls" / "vid_a")  # found by name, recursively
    for train in (False, True):  # fixed frames and centre crop; random frames, crop and caption
        data = RetrievalDataset(ann, num_frames=5, image_size=24, train=train, unit="video")
        a = data._item(0, np.random.default_rng(9))  # the folder and the file, with the same draws
        b = data._item(1, np.random.default_rng(9))
        assert torch.equal(a["video"], b["video"])

    (tmp_path / "k.txt").write_text("cls/vid_a 15 1\nrawframes/vid_b 15 0\n")  # mmaction2's rawframes list
    kinetics = load_kinetics(tmp_path / "k.txt", frame_dirs / "rawframes", ["x", "y"])
    assert kinetics.labels.tolist() == [1, 0] and kinetics.video_paths[1].endswith("vid_b")
    assert VideoFinder(frame_dirs).find("vid_b") == frame_dirs / "rawframes" / "vid_b"
    (frame_dirs / "rawframes" / "vid_b.mkv").write_bytes((frame_dirs / "lossless.mkv").read_bytes())
    assert VideoFinder(frame_dirs / "rawframes").find("vid_b").name == "vid_b.mkv"  # a file beats its frames
    (frame_dirs / "rawframes" / "vid_b.mkv").unlink()


def test_frame_folder_problems_name_the_folder_or_the_image(tmp_path):
    with pytest.raises(VideoReadError, match="folder without images"):
        (tmp_path / "empty").mkdir()
        stanvid.probe(tmp_path / "empty")
    folder = write_folder(tmp_path / "odd", [f"{i:03d}.png" for i in range(15)])
    Image.fromarray(FRAMES[0][:20]).save(folder / "007.png")
    with pytest.raises(VideoReadError, match=r"007\.png: frame 7 is 56x20 but the first frame is 56x40"):
        stanvid.read_frames(folder, [6, 7])
    (folder / "003.png").write_bytes(b"not a png")
    with pytest.raises(VideoReadError, match=r"003\.png: frame 3 is not a readable image"):
        stanvid.read_frames(folder, [3])


def test_a_video_in_memory_reads_like_its_file(phone):
    data = (phone / "r90.mp4").read_bytes()
    memory = MemoryVideo(data, name="shard-00001.tar:000000007")
    assert stanvid.probe(memory) == dataclasses.replace(stanvid.probe(phone / "r90.mp4"), path=memory.name)
    assert torch.equal(
        stanvid.read_frames(memory, [1, 5], size=24), stanvid.read_frames(phone / "r90.mp4", [1, 5], size=24)
    )
    assert torch.equal(stanvid.read_frames(data, [4]), stanvid.read_frames(phone / "r90.mp4", [4]))
    with pytest.raises(VideoReadError, match="shard-00001.tar:000000008: not a readable video"):
        stanvid.probe(MemoryVideo(data[:100], name="shard-00001.tar:000000008"))

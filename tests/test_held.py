"""`stanvid.video.held.DecodedVideo`: a video decoded once reads back through `probe` / `read_frames` as its
file does (the same frames, the same index checks), and refuses a size it cannot give exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stanvid.errors import ConfigError, VideoReadError
from stanvid.video.decode import probe, read_frames
from stanvid.video.held import DecodedVideo
from videogen import make_frames, write_video


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("held") / "clip.mp4"
    return write_video(path, make_frames(20, 48, 64, seed=5), fps=10, gop=6, bframes=2)


def _hold(path) -> DecodedVideo:
    info = probe(path)
    return DecodedVideo(read_frames(path, np.arange(info.num_frames)), name=str(path), fps=info.fps)


def test_held_frames_are_the_files_frames(video):
    held = _hold(video)
    info, file_info = probe(held), probe(video)
    assert (info.num_frames, info.width, info.height, info.fps) == (
        file_info.num_frames,
        file_info.width,
        file_info.height,
        file_info.fps,
    )
    assert info.codec == "decoded" and held.nbytes == 20 * 48 * 64 * 3
    for indices in ([0], [19, 3, 3, 7], np.arange(20)[::-1], torch.tensor([2, 11])):
        torch.testing.assert_close(read_frames(held, indices), read_frames(video, indices), rtol=0, atol=0)
    # the shortest side as `size` is the frames as they are, from the file's decoder too
    torch.testing.assert_close(
        read_frames(held, [4], size=48), read_frames(video, [4], size=48), rtol=0, atol=0
    )


def test_held_frames_check_indices_and_size_as_a_file_read_does(video):
    held = _hold(video)
    with pytest.raises(VideoReadError, match="frame index 20 out of range: the video has 20 frames"):
        read_frames(held, [20])
    with pytest.raises(VideoReadError, match=str(video)):
        read_frames(held, [-1])
    with pytest.raises(ConfigError, match="own size"):
        read_frames(held, [0], size=24)
    out = read_frames(held, [1])
    out.zero_()  # a copy: the held frames are untouched
    assert held.frames[1].any()


def test_bad_frames_are_refused_with_their_name():
    with pytest.raises(ConfigError, match="clip-x"):
        DecodedVideo(torch.zeros(3, 8, 8, 3), name="clip-x")  # float, not uint8
    with pytest.raises(ConfigError, match=r"\(F >= 1, H, W, 3\)"):
        DecodedVideo(torch.zeros(0, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="fps"):
        DecodedVideo(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), fps=0)

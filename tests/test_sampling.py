"""Frame samplers: the official UniformSample's test indices, the ranges of its training draws, dense clips."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stanvid
from stanvid.errors import ConfigError
from stanvid.video.sampling import dense_indices, uniform_indices


def test_uniform_test_mode_matches_official_sampler(parity):
    data = json.loads(parity("sampling_uniform_test.json").read_text())
    assert len(data["cases"]) > 200
    for case in data["cases"]:
        got = uniform_indices(case["num_frames"], case["clip_len"], case["num_clips"], mode="test")
        assert got.dtype == np.int64
        assert got.tolist() == case["frame_inds"], case


def test_uniform_is_exported():
    assert stanvid.uniform_indices is uniform_indices
    assert stanvid.dense_indices is dense_indices


def _segments(num_frames: int, clip_len: int) -> list[range]:
    """Segment i of the official sampler: [round(seg * i), round(seg * (i + 1))], both ends included."""
    seg = (num_frames - 1) / clip_len
    return [range(int(np.round(seg * i)), int(np.round(seg * (i + 1))) + 1) for i in range(clip_len)]


@pytest.mark.parametrize("num_frames,clip_len", [(25, 4), (100, 12), (7, 12), (1, 3), (13, 12)])
def test_uniform_train_draws_cover_exactly_each_segment(num_frames, clip_len):
    rng = np.random.default_rng(0)
    draws = np.stack([uniform_indices(num_frames, clip_len, mode="train", rng=rng) for _ in range(3000)])
    for i, segment in enumerate(_segments(num_frames, clip_len)):
        assert set(draws[:, i].tolist()) == set(segment), (i, segment)


def test_uniform_train_is_reproducible_and_multi_clip():
    a = uniform_indices(300, 12, mode="train", rng=5)
    b = uniform_indices(300, 12, mode="train", rng=np.random.default_rng(5))
    c = uniform_indices(300, 12, mode="train", rng=6)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    two = uniform_indices(300, 12, num_clips=2, mode="train", rng=1).reshape(2, 12)
    assert two[0].tolist() != two[1].tolist()
    for clip in two:
        for value, segment in zip(clip.tolist(), _segments(300, 12), strict=True):
            assert value in segment


def test_uniform_short_video_repeats_frames():
    got = uniform_indices(3, 8, mode="test")
    assert len(got) == 8 and set(got.tolist()) <= {0, 1, 2}
    assert np.all(np.diff(got) >= 0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_frames": 0, "clip_len": 8}, "num_frames"),
        ({"num_frames": -3, "clip_len": 8}, "num_frames"),
        ({"num_frames": 10, "clip_len": 0}, "clip_len"),
        ({"num_frames": 10, "clip_len": 4, "num_clips": 0}, "num_clips"),
        ({"num_frames": 10.5, "clip_len": 4}, "num_frames"),
        ({"num_frames": 10, "clip_len": 4, "mode": "val"}, "mode"),
    ],
)
def test_uniform_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        uniform_indices(**kwargs)


def test_dense_test_single_clip_is_centred():
    # 8x8 on 300 frames: span (8 - 1) * 8 + 1 = 57 frames, start (300 - 57) // 2
    start = (300 - 57) // 2
    assert dense_indices(300, 8, 8).tolist() == list(range(start, start + 57, 8))


def test_dense_test_views_spread_from_first_to_last_frame():
    inds = dense_indices(300, 16, 4, num_clips=4).reshape(4, 16)
    assert inds[0, 0] == 0 and inds[-1, -1] == 299
    assert np.all(np.diff(inds, axis=1) == 4)
    exact = np.arange(4) * (300 - 61) / 3  # evenly spaced starts, before rounding to frames
    assert np.abs(inds[:, 0] - exact).max() <= 0.5


def test_dense_short_video_loops_or_repeats_last():
    looped = dense_indices(20, 8, 4, mode="test")  # span 29 > 20 frames: start 0, wrap around
    assert looped.tolist() == [(4 * i) % 20 for i in range(8)]
    repeated = dense_indices(20, 8, 4, mode="test", out_of_bound="repeat_last")
    assert repeated.tolist() == [min(4 * i, 16) for i in range(8)]


def test_dense_train_clips_start_inside_their_span():
    num_frames, clip_len, interval, clips = 200, 8, 4, 3
    avg = (num_frames - clip_len * interval + 1) // clips
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(500):
        inds = dense_indices(num_frames, clip_len, interval, clips, mode="train", rng=rng).reshape(
            clips, clip_len
        )
        assert np.all(np.diff(inds, axis=1) == interval)
        for k, start in enumerate(inds[:, 0].tolist()):
            assert k * avg <= start < (k + 1) * avg
            seen.add((k, start - k * avg))
    assert len(seen) == clips * avg  # every offset of every span is drawn
    again = dense_indices(num_frames, clip_len, interval, clips, mode="train", rng=3)
    assert (
        again.tolist() == dense_indices(num_frames, clip_len, interval, clips, mode="train", rng=3).tolist()
    )


def test_dense_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="frame_interval"):
        dense_indices(100, 8, 0)
    with pytest.raises(ConfigError, match="out_of_bound"):
        dense_indices(100, 8, 2, out_of_bound="clamp")
    with pytest.raises(ConfigError, match="num_frames"):
        dense_indices(0, 8, 2)

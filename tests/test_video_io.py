"""read_frames / probe against the definition: decode the whole file in order and pick the indices.

Every video is generated here with PyAV (tests/videogen.py): several codecs and containers, GOP sizes from 1
to 50, B-frames with and without open GOPs, odd sizes, variable frame rate, a raw stream without timestamps,
and damaged files. The reference is PyAV's plain sequential decode with its default settings, so the seek
planner, the NONREF skipping, frame threads and the resize in the scaler are all checked against it bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import wave
from dataclasses import dataclass

import av
import numpy as np
import pytest
import torch

import stanvid
from stanvid import VideoReadError
from stanvid.video import decode as video_io
from videogen import available_codecs, frame_code, make_frames, write_video

CODECS = set(available_codecs())
pytestmark = pytest.mark.filterwarnings(
    "error::RuntimeWarning"
)  # a fallback to sequential reads is a bug here


@dataclass(frozen=True)
class Case:
    name: str
    codec: str
    ext: str
    gop: int = 12
    bframes: int = 2
    open_gop: bool = False
    pix_fmt: str = "yuv420p"
    height: int = 48
    width: int = 64
    frames: int = 50
    vfr: bool = False
    faststart: bool = False


CASES = [
    Case("h264-mp4", "h264", "mp4"),
    Case("h264-mp4-open-gop", "h264", "mp4", gop=8, bframes=3, open_gop=True),
    Case("h264-mkv-intra", "h264", "mkv", gop=1, bframes=0),
    Case("h264-mov-gop2", "h264", "mov", gop=2, bframes=2),  # GOP shorter than the B-frame delay
    Case("h264-mp4-long-gop", "h264", "mp4", gop=50, bframes=3, frames=60),
    Case("h264-mkv-vfr", "h264", "mkv", gop=10, bframes=2, vfr=True),
    Case("h264-mp4-vfr-faststart", "h264", "mp4", gop=7, bframes=1, vfr=True, faststart=True),
    Case("h264-444-odd", "h264", "mp4", pix_fmt="yuv444p", height=35, width=47),
    Case("h264-raw-stream", "h264", "h264"),  # no timestamps: read by counting from the start
    Case("hevc-mp4", "hevc", "mp4", gop=8, bframes=3, open_gop=True),
    Case("mpeg4-avi", "mpeg4", "avi", gop=10, bframes=2),
    Case("mpeg4-mp4-odd", "mpeg4", "mp4", gop=6, bframes=1, height=34, width=50),
    Case("vp9-webm-odd", "vp9", "webm", gop=10, height=33, width=49),
    Case("vp9-webm-vfr", "vp9", "webm", gop=8, vfr=True),
    Case("av1-mkv", "av1", "mkv", gop=12),
]


def _vfr_pts(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.cumsum(rng.integers(1, 4, size=n)) - 1  # gaps of 1-3 ticks of 1/25 s


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    made: dict[str, str] = {}

    def get(case: Case) -> str:
        if case.codec not in CODECS:
            pytest.skip(f"PyAV here cannot encode and decode {case.codec}")
        if case.name not in made:
            path = root / f"{case.name}.{case.ext}"
            frames = make_frames(case.frames, case.height, case.width, seed=len(made))
            write_video(
                path,
                frames,
                codec=case.codec,
                gop=case.gop,
                bframes=case.bframes,
                open_gop=case.open_gop,
                pix_fmt=case.pix_fmt,
                pts=_vfr_pts(case.frames) if case.vfr else None,
                container_options={"movflags": "faststart"} if case.faststart else None,
            )
            made[case.name] = str(path)
        return made[case.name]

    return get


def sequential(path: str, size: int | None = None) -> np.ndarray:
    """The definition: every frame in decode output order, (N, H, W, 3) uint8, PyAV defaults.

    A truncated file's last packet, cut short, may be refused by the decoder: decoding stops there, as a
    player stops at the end of the data."""
    out = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in _decode_until_cut(container, stream):
            if size is None:
                out.append(frame.to_ndarray(format="rgb24"))
            else:
                w, h = _short_side(frame.width, frame.height, size)
                out.append(
                    frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_ndarray()
                )
    return np.stack(out)


def _decode_until_cut(container, stream):
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker: drained below
            continue
        try:
            yield from stream.decode(packet)
        except av.error.InvalidDataError:
            assert packet.is_corrupt, "only the packet the cut went through may fail"
            break
    yield from stream.decode(None)


def _short_side(width: int, height: int, size: int) -> tuple[int, int]:
    """Shortest side to `size`, the other side scaled and rounded half up (read_frames' documented rule)."""
    if width <= height:
        return size, math.floor(height * size / width + 0.5)
    return math.floor(width * size / height + 0.5), size


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_read_frames_matches_sequential_decode(videos, case):
    path = videos(case)
    ref = sequential(path)  # (N, H, W, 3)
    n = len(ref)
    assert stanvid.probe(path).num_frames == n == case.frames
    if case.width >= 48:  # the generator's code band survives the codec: the reference itself is right
        assert [frame_code(f) for f in ref] == list(range(n))

    rng = np.random.default_rng(0)
    index_sets = [
        np.arange(n),  # everything
        np.arange(n)[::-1],  # backwards
        np.array([n - 1, 0, n // 2, n // 2, 0]),  # unsorted with repeats
        np.array([n - 1]),  # only the last frame (the end of the last GOP)
        *[rng.integers(0, n, size=int(rng.integers(1, 9))) for _ in range(12)],
    ]
    for idx in index_sets:
        got = stanvid.read_frames(path, idx)
        assert got.dtype == torch.uint8 and got.shape == (len(idx), case.height, case.width, 3)
        np.testing.assert_array_equal(got.numpy(), ref[idx], err_msg=f"{case.name} indices {idx.tolist()}")


# h264, open GOP, odd-sized 4:4:4, odd-sized VP9
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[7], CASES[12]], ids=lambda c: c.name)
@pytest.mark.parametrize("size", [24, 32, 80])
def test_size_matches_sequential_decode_with_the_same_scaler(videos, case, size):
    path = videos(case)
    ref = sequential(path, size=size)
    idx = np.array([3, 0, 41, 17, 17, 49])
    got = stanvid.read_frames(path, idx, size=size).numpy()
    assert min(got.shape[1:3]) == size
    np.testing.assert_array_equal(got, ref[idx])


def test_probe_reports_exact_stream_facts(videos):
    info = stanvid.probe(videos(CASES[0]))
    assert (info.num_frames, info.width, info.height, info.codec) == (50, 64, 48, "h264")
    assert info.fps == pytest.approx(25.0) and info.duration == pytest.approx(2.0)
    assert info.num_keyframes == math.ceil(50 / 12) and info.seekable and not info.truncated


def test_probe_variable_frame_rate_duration_and_mean_rate(videos):
    case = CASES[5]
    info = stanvid.probe(videos(case))
    pts = _vfr_pts(case.frames)
    span = (pts[-1] - pts[0] + 1) / 25  # the last frame lasts one tick
    assert info.num_frames == case.frames
    assert info.duration == pytest.approx(span, abs=0.04)
    assert info.fps == pytest.approx(case.frames / info.duration)


def test_raw_stream_is_counted_by_decoding(videos):
    info = stanvid.probe(videos(CASES[8]))
    assert not info.seekable and info.num_frames == 50


def test_skipping_nonreference_frames_changes_nothing(videos, monkeypatch):
    path = videos(CASES[4])  # 50-frame GOP with B-pyramid: most frames on the way are skippable
    idx = np.array([37, 5, 59, 22])
    fast = stanvid.read_frames(path, idx)
    monkeypatch.setattr(video_io, "SKIP_NONREF_CODECS", frozenset())
    plain = stanvid.read_frames(path, idx)
    single = stanvid.read_frames(path, idx, threads=1)
    assert torch.equal(fast, plain) and torch.equal(fast, single)


def test_threads_split_runs_over_decoders_and_default_to_one_in_loader_workers(videos, monkeypatch):
    path = videos(CASES[4])
    idx = np.array([59, 3, 40, 12, 25])
    ref = sequential(path)[idx]
    for threads in (0, 1, 2, 3, 8):
        np.testing.assert_array_equal(stanvid.read_frames(path, idx, threads=threads).numpy(), ref)
    seen = []
    real = video_io._decode_runs
    monkeypatch.setattr(video_io, "_decode_runs", lambda *a: seen.append(a[-1]) or real(*a))
    monkeypatch.setattr(video_io, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    stanvid.read_frames(path, idx)
    assert seen == [1]


def test_plan_seeks_once_per_keyframe_segment(videos):
    path = videos(CASES[0])  # 50 frames, keyframe every 12
    index = video_io._get_index(path)
    one_gop = video_io._plan(index, np.array([1, 2, 9]))
    assert len(one_gop) == 1 and one_gop[0].start == 0
    spread = video_io._plan(index, np.array([1, 14, 27, 40]))
    assert [run.start for run in spread] == [0, 12, 24, 36]
    # when the decoder stands right before the next keyframe, a frame of the next GOP continues the run
    last_of_gop = int(np.flatnonzero(index.frame_pos == 11)[0])  # the packet before keyframe 12
    across = video_io._plan(index, np.array([last_of_gop, 13]))
    assert len(across) == 1 and across[0].end == index.frame_pos[13]


def test_open_gop_leading_frames_start_one_keyframe_earlier(videos):
    index = video_io._get_index(videos(CASES[1]))
    key_pos = np.flatnonzero(index.pkt_key)
    leading = 0
    for i in range(index.info.num_frames):
        last_key = key_pos[key_pos <= index.frame_pos[i]].max()
        if index.pkt_pts[last_key] > index.frame_pts[i]:  # decoded after a keyframe, shown before it
            leading += 1
            assert index.frame_start[i] < last_key
        else:
            assert index.frame_start[i] == last_key
    assert leading > 0  # the encoder did write open GOPs


def test_stream_cut_in_the_middle_of_a_gop_counts_what_the_decoder_shows(tmp_path):
    full, cut = tmp_path / "full.ts", tmp_path / "cut.ts"
    write_video(full, make_frames(60, 48, 64, seed=5), gop=20, bframes=2)
    with av.open(str(full)) as inp, av.open(str(cut), "w") as out:  # drop the first 7 packets, no re-encode
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for i, packet in enumerate(p for p in inp.demux(stream) if p.size):
            if i >= 7:
                packet.stream = copy
                out.mux(packet)
    ref = sequential(str(cut))  # the decoder drops the frames before the first keyframe
    info = stanvid.probe(cut)
    assert info.num_frames == len(ref) and not info.seekable
    idx = np.array([len(ref) - 1, 0, 5, 5])
    np.testing.assert_array_equal(stanvid.read_frames(cut, idx).numpy(), ref[idx])


def test_packets_the_index_does_not_know_fall_back_to_sequential_decoding(videos, monkeypatch):
    path = videos(CASES[0])
    index = video_io._get_index(path)
    # as if the demuxer now named its packets differently from the demux pass
    stale = dataclasses.replace(index, pts_sorted=index.pts_sorted + 1)
    monkeypatch.setattr(video_io, "_get_index", lambda p: stale)
    idx = np.array([30, 2, 47])
    with pytest.warns(RuntimeWarning, match="decoding from the start"):
        got = stanvid.read_frames(path, idx)
    np.testing.assert_array_equal(got.numpy(), sequential(path)[idx])


def test_index_input_types_and_empty_request(videos):
    path = videos(CASES[0])
    ref = stanvid.read_frames(path, [4, 9])
    assert torch.equal(stanvid.read_frames(path, torch.tensor([4, 9])), ref)
    assert torch.equal(stanvid.read_frames(path, np.array([4, 9], dtype=np.int32)), ref)
    assert stanvid.read_frames(path, []).shape == (0, 48, 64, 3)
    assert stanvid.read_frames(path, [], size=24).shape == (0, 24, 32, 3)
    with pytest.raises(TypeError, match="integers"):
        stanvid.read_frames(path, [1.5])
    with pytest.raises(ValueError, match="size"):
        stanvid.read_frames(path, [1], size=0)


def test_cache_follows_file_changes(videos, tmp_path):
    path = tmp_path / "changing.mp4"
    write_video(path, make_frames(20, 48, 64), gop=5)
    assert stanvid.probe(path).num_frames == 20
    write_video(path, make_frames(30, 48, 64), gop=5)
    assert stanvid.probe(path).num_frames == 30
    np.testing.assert_array_equal(stanvid.read_frames(path, [29]).numpy(), sequential(str(path))[[29]])


# ------------------------------------------------------------------------------------------- bad input


def test_missing_empty_and_non_video_files(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoReadError, match=r"nope\.mp4.*no such file"):
        stanvid.probe(missing)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match=r"empty\.mp4.*empty"):
        stanvid.read_frames(empty, [0])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoReadError, match=r"notes\.mp4.*not a readable video"):
        stanvid.probe(text)
    with pytest.raises(VideoReadError, match="a folder without images"):  # a folder is a video of its images
        stanvid.probe(tmp_path)
    audio = tmp_path / "tone.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(8000) / 5) * 3000).astype(np.int16).tobytes())
    with pytest.raises(VideoReadError, match=r"tone\.wav.*no video stream"):
        stanvid.read_frames(audio, [0])


def test_index_out_of_range(videos):
    path = videos(CASES[0])
    for bad in ([50], [-1], [0, 3, 1000]):
        with pytest.raises(VideoReadError, match=r"h264-mp4\.mp4.*out of range.*50 frames"):
            stanvid.read_frames(path, bad)


def test_truncated_mp4_without_index_is_unreadable(videos, tmp_path):
    data = open(videos(CASES[0]), "rb").read()  # moov written last: cutting the file loses the index
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoReadError, match=r"cut\.mp4"):
        stanvid.probe(cut)


@pytest.mark.parametrize("case", [CASES[6], CASES[2], CASES[10], CASES[12]], ids=lambda c: c.name)
@pytest.mark.parametrize("keep", [0.4, 0.75])
def test_truncated_file_gives_frames_before_the_cut(videos, tmp_path, case, keep):
    data = open(videos(case), "rb").read()
    cut = tmp_path / f"cut{int(keep * 100)}.{case.ext}"
    cut.write_bytes(data[: int(len(data) * keep)])
    info = stanvid.probe(cut)
    assert 0 < info.num_frames < case.frames
    ref = sequential(str(cut))
    assert len(ref) >= info.num_frames
    got = stanvid.read_frames(cut, np.arange(info.num_frames)[::-1]).numpy()[::-1]
    np.testing.assert_array_equal(got, ref[: info.num_frames])
    if case.width >= 48:  # never a duplicated or reordered frame (frames the cut removed may be absent)
        codes = [frame_code(f) for f in got]
        assert codes == sorted(set(codes))
    with pytest.raises(VideoReadError, match="out of range.*truncated" if info.truncated else "out of range"):
        stanvid.read_frames(cut, [info.num_frames])


def test_truncated_raw_stream_refuses_the_damaged_frame(videos, tmp_path):
    data = open(videos(CASES[8]), "rb").read()
    cut = tmp_path / "cut.h264"
    cut.write_bytes(data[: int(len(data) * 0.5)])
    info = stanvid.probe(cut)
    ref = sequential(str(cut))
    readable = []
    for i in range(info.num_frames):
        try:
            readable.append(stanvid.read_frames(cut, [i]).numpy()[0])
        except VideoReadError as exc:
            assert "damaged" in str(exc)
            continue
        np.testing.assert_array_equal(readable[-1], ref[i])
        assert frame_code(readable[-1]) == i
    assert len(readable) >= info.num_frames - 2

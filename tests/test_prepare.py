"""prepare_videos / `stanvid prepare-videos` on a generated folder with a corrupt file among good ones.

Inputs are 128x64 at 25 fps (one of them variable-rate) carrying their frame index in a code band; outputs at
5 fps with shortest side 32 halve that band exactly, so each output frame's index can be read back and compared
with the input frame shown at that moment.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

import stanvid
from stanvid import ConfigError
from stanvid.cli import main as cli_main
from stanvid.video.folders import find_videos
from stanvid.video.prepare import MANIFEST, prepare_videos
from videogen import available_codecs, frame_code, make_frames, write_video

FPS_IN, FPS_OUT = 25, 5
VFR_PTS = np.cumsum(np.tile([1, 3, 2, 1, 5], 8)) - 1  # 40 frames over 103 ticks of 1/25 s


@pytest.fixture
def source(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    write_video(src / "a.mp4", make_frames(50, 64, 128, seed=1), fps=FPS_IN, gop=12, bframes=2)
    write_video(src / "sub" / "vfr.mkv", make_frames(40, 64, 128, seed=2), fps=FPS_IN, gop=10, pts=VFR_PTS)
    codec = "vp9" if "vp9" in available_codecs() else "h264"
    third = src / "sub" / "deeper" / ("c.webm" if codec == "vp9" else "c.mov")
    write_video(third, make_frames(23, 64, 128, seed=3), fps=FPS_IN, codec=codec, gop=8)
    (src / "sub" / "broken.avi").write_bytes(os.urandom(4000))  # a video by name only
    (src / "notes.txt").write_text("not a video")
    (src / ".hidden.mp4").write_bytes(b"macOS resource fork")
    return src


def expected_codes(pts_ticks: np.ndarray) -> list[int]:
    """Input frame shown at k / FPS_OUT s: the last one starting at or before it; until the last one ends."""
    times = (pts_ticks - pts_ticks[0]) / FPS_IN
    end = times[-1] + 1 / FPS_IN
    slots = math.ceil(end * FPS_OUT - 1e-9)
    return [int(np.searchsorted(times, k / FPS_OUT + 1e-9, side="right") - 1) for k in range(slots)]


def read_all(path: Path) -> np.ndarray:
    info = stanvid.probe(path)
    return stanvid.read_frames(path, np.arange(info.num_frames)).numpy()


def test_prepare_converts_resamples_and_reports_the_broken_file(source, tmp_path):
    dst = tmp_path / "dst"
    report = prepare_videos(source, dst, fps=FPS_OUT, short_side=32, workers=2, crf=12, progress=False)
    converted = ["a.mp4", "sub/deeper/c.mov", "sub/vfr.mkv"]
    if (source / "sub" / "deeper" / "c.webm").exists():
        converted[1] = "sub/deeper/c.webm"
    assert sorted(report.converted) == sorted(converted)
    assert [name for name, _ in report.failed] == ["sub/broken.avi"] and not report.ok
    assert "broken.avi" in report.summary()

    cases = {
        "a.mp4": np.arange(50),
        "sub/vfr.mp4": VFR_PTS,
        Path(converted[1]).with_suffix(".mp4").as_posix(): np.arange(23),
    }
    for name, pts in cases.items():
        out = dst / name
        info = stanvid.probe(out)
        assert (info.width, info.height, info.codec) == (64, 32, "h264")
        assert info.fps == pytest.approx(FPS_OUT)
        codes = [frame_code(frame) for frame in read_all(out)]
        assert codes == expected_codes(pts), name
        assert info.num_keyframes == math.ceil(info.num_frames / FPS_OUT)  # one keyframe per second
    assert not (dst / "sub" / "broken.mp4").exists()
    assert not [p for p in dst.rglob("*") if p.name.endswith(".partial.mp4")]


def test_rerun_skips_finished_outputs_and_redoes_interrupted_ones(source, tmp_path):
    dst = tmp_path / "dst"
    first = prepare_videos(source, dst, fps=FPS_OUT, short_side=32, workers=1, progress=False)
    assert len(first.converted) == 3
    done = {p: p.stat().st_mtime_ns for p in dst.rglob("*.mp4")}

    # an interrupted run leaves a partial file and no output: the file is converted again, the partial removed
    (dst / "a.mp4").unlink()
    (dst / ".a.999.1.partial.mp4").write_bytes(b"half a video")
    (dst / ".a.b.999.1.partial.mp4").write_bytes(b"another output's work in progress")
    second = prepare_videos(source, dst, fps=FPS_OUT, short_side=32, workers=2, progress=False)
    assert second.converted == ["a.mp4"]
    assert sorted(second.skipped) == sorted(n for n in first.converted if n != "a.mp4")
    assert [name for name, _ in second.failed] == ["sub/broken.avi"]
    for path, mtime in done.items():
        if path.name != "a.mp4":
            assert path.stat().st_mtime_ns == mtime  # skipped files were not rewritten
    assert not (dst / ".a.999.1.partial.mp4").exists()
    assert (dst / ".a.b.999.1.partial.mp4").exists()  # not a.mp4's: left alone


def test_other_settings_on_a_prepared_folder_are_refused(source, tmp_path):
    dst = tmp_path / "dst"
    (source / "sub" / "broken.avi").unlink()
    prepare_videos(source, dst, fps=FPS_OUT, short_side=32, workers=1, progress=False)
    assert (dst / MANIFEST).exists()
    with pytest.raises(ConfigError, match="fps=5.*now 4"):
        prepare_videos(source, dst, fps=4, short_side=32, workers=1, progress=False)
    for damaged in ("{not json", "[1, 2]"):  # neither is a manifest: named, not a traceback
        (dst / MANIFEST).write_text(damaged)
        with pytest.raises(ConfigError, match="unreadable manifest"):
            prepare_videos(source, dst, fps=FPS_OUT, short_side=32, workers=1, progress=False)


def test_bad_settings(source, tmp_path):
    with pytest.raises(ConfigError, match="short_side must be an even"):
        prepare_videos(source, tmp_path / "d", short_side=225)
    with pytest.raises(ConfigError, match="codec"):
        prepare_videos(source, tmp_path / "d", codec="realvideo")
    with pytest.raises(ConfigError, match="fps"):
        prepare_videos(source, tmp_path / "d", fps=0)
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_videos(tmp_path / "nowhere", tmp_path / "d")
    with pytest.raises(ConfigError, match="must differ"):
        prepare_videos(source, source)


def test_output_folder_inside_the_source_is_not_read_back(source):
    dst = source / "small"
    report = prepare_videos(source, dst, fps=FPS_OUT, short_side=None, workers=1, progress=False)
    assert len(report.converted) == 3
    assert (stanvid.probe(dst / "a.mp4").width, stanvid.probe(dst / "a.mp4").height) == (128, 64)  # size kept
    assert all(dst not in p.parents for p in find_videos(source, exclude=dst))
    again = prepare_videos(source, dst, fps=FPS_OUT, short_side=None, workers=1, progress=False)
    assert len(again.skipped) == 3 and not again.converted


def test_cli_exit_codes(source, tmp_path, capsys):
    dst = tmp_path / "dst"
    args = ["prepare-videos", str(source), str(dst), "--fps", "5", "--short-side", "32", "--workers", "1"]
    assert cli_main([*args, "--no-progress"]) == 1  # the broken file
    err = capsys.readouterr().err
    assert "FAILED sub/broken.avi" in err and "converted 3" in err
    (source / "sub" / "broken.avi").unlink()
    assert cli_main([*args, "--no-progress"]) == 0
    assert "skipped 3" in capsys.readouterr().out
    assert cli_main(["prepare-videos", str(source), str(dst), "--short-side", "31", "--no-progress"]) == 2

"""The WebVid caption format (Mug-STAN post-pretraining): the released CSV and the official json dict."""

from __future__ import annotations

import json

import pytest

from stanvid.data.retrieval_formats import load_webvid
from stanvid.errors import DatasetError

HEADER = "videoid,contentUrl,duration,page_dir,name\n"


def _videos(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded here")


def test_csv_rows_resolve_to_page_dir_files_and_missing_downloads_are_listed(tmp_path):
    videos = tmp_path / "videos"
    _videos(videos, ["000001_000050/11.mp4", "000051_000100/12.webm"])
    csv = tmp_path / "results_2M_train.csv"
    csv.write_text(
        HEADER
        + '11,http://x/11.mp4,PT00H00M12S,000001_000050,"Aerial view, of a lake"\n'
        + "12,http://x/12.mp4,PT00H00M05S,000051_000100,Dog runs on the beach\n"
        + "13,http://x/13.mp4,PT00H00M05S,000051_000100,Never downloaded\n"
    )
    ann = load_webvid(csv, videos)
    assert ann.captions == ["Aerial view, of a lake", "Dog runs on the beach"]
    assert [p.replace(str(videos), "") for p in map(str, ann.video_paths)] == [
        "/000001_000050/11.mp4",
        "/000051_000100/12.webm",
    ]
    assert len(ann.missing) == 1 and "000051_000100/13" in ann.missing[0]
    with pytest.raises(DatasetError, match="13"):
        load_webvid(csv, videos, on_missing="raise")


@pytest.mark.parametrize(
    "row, message",
    [
        ("11,u,d,../outside,a caption", "page_dir"),
        ("a/11,u,d,000001_000050,a caption", "videoid"),
        ("11,u,d,000001_000050,   ", "empty caption"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, row, message):
    (tmp_path / "videos").mkdir()
    csv = tmp_path / "w.csv"
    csv.write_text(HEADER + row + "\n")
    with pytest.raises(DatasetError, match=rf"w.csv:2: .*{message}"):
        load_webvid(csv, tmp_path / "videos")


def test_missing_column_and_official_json(tmp_path):
    videos = tmp_path / "videos"
    _videos(videos, ["a/1.mp4"])
    bad = tmp_path / "bad.csv"
    bad.write_text("videoid,name\n1,x\n")
    with pytest.raises(DatasetError, match="page_dir"):
        load_webvid(bad, videos)
    official = tmp_path / "webvid.json"
    official.write_text(json.dumps({"a/1.mp4": "a cat"}))
    assert load_webvid(official, videos).captions == ["a cat"]

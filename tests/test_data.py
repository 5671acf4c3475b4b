"""Datasets on small generated copies of each benchmark's annotation files, with real (tiny) videos."""

from __future__ import annotations

import csv
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import stanvid
from stanvid.data import (
    RecognitionDataset,
    RetrievalDataset,
    SkippedSample,
    collate_skipping,
    load_activitynet,
    load_caption_json,
    load_didemo,
    load_kinetics,
    load_lsmdc,
    load_msrvtt,
    load_msrvtt_test,
    load_msvd,
    load_retrieval,
    load_ssv2,
    load_video_captions,
    make_loader,
    read_class_names,
)
from stanvid.data.datasets import (
    DATASET_NAMES,
    DATASETS,
    RETRIEVAL_DATASETS,
    SplitFiles,
    dataset_task,
    read_split,
)
from stanvid.errors import ConfigError, DatasetError, VideoReadError
from stanvid.training.recipe import DATASETS as RECIPE_DATASETS
from stanvid.video.sampling import uniform_indices
from stanvid.video.transforms import CLIP_MEAN, CLIP_STD, EvalTransform
from videogen import available_codecs, frame_code, make_frames, write_video

SIZE = 64  # square videos at the model size: no resize, no crop, so frame codes can be read back
LENGTHS = [20, 27, 33, 16, 24, 30]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """video0..video5.mp4 (64x64, different lengths), one broken file, and a wider clip."""
    root = tmp_path_factory.mktemp("videos")
    for i, n in enumerate(LENGTHS):
        write_video(root / f"video{i}.mp4", make_frames(n, SIZE, SIZE, seed=i), fps=10, gop=8)
    write_video(root / "wide.mp4", make_frames(14, 64, 96, seed=9), fps=10, gop=8)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return root


def _codes(video: torch.Tensor) -> list[int]:
    """Frame indices drawn in the code band of normalized (T, 3, S, S) frames."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = ((video * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [frame_code(f) for f in pixels]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- MSR-VTT --------------------------------------------------------------------------------------------


def _msrvtt_files(folder: Path) -> dict[str, list[str]]:
    captions = {f"video{i}": [f"a clip number {i} caption {k}" for k in range(i % 3 + 1)] for i in range(6)}
    captions["video77"] = ["a video that was never downloaded"]  # in the json but in no split
    sentences = [
        {"caption": c, "video_id": v, "sen_id": n}
        for n, (v, c) in enumerate((v, c) for v, cs in captions.items() for c in cs)
    ]
    (folder / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    _write_csv(folder / "MSRVTT_train.9k.csv", ["video_id"], [["video4"], ["video0"], ["video2"]])
    _write_csv(folder / "MSRVTT_train.7k.csv", ["video_id"], [["video0"]])
    _write_csv(
        folder / "MSRVTT_JSFUSION_test.csv",
        ["", "key", "vid_key", "video_id", "sentence"],
        [[i, f"ret{i}", f"msr{i}", f"video{i}", f"test sentence {i}"] for i in (1, 3, 5)],
    )
    return captions


def test_msrvtt_train_split_every_caption(tmp_path, videos):
    captions = _msrvtt_files(tmp_path)
    ann = load_msrvtt(tmp_path / "MSRVTT_train.9k.csv", tmp_path / "MSRVTT_data.json", videos)
    assert ann.video_ids == ["video4", "video0", "video2"]
    assert ann.video_paths == [str(videos / f"{v}.mp4") for v in ann.video_ids]
    expected = [(c, j) for j, v in enumerate(ann.video_ids) for c in captions[v]]
    assert list(zip(ann.captions, ann.text_to_video.tolist(), strict=True)) == expected
    assert ann.video_to_texts() == [[0, 1], [2], [3, 4, 5]]
    assert load_retrieval("msrvtt", "train-9k", tmp_path, videos).captions == ann.captions
    assert load_retrieval("msrvtt", "train-7k", tmp_path, videos).video_ids == ["video0"]


def test_msrvtt_jsfusion_test(tmp_path, videos):
    _msrvtt_files(tmp_path)
    ann = load_msrvtt_test(tmp_path / "MSRVTT_JSFUSION_test.csv", videos)
    assert ann.video_ids == ["video1", "video3", "video5"]
    assert ann.captions == ["test sentence 1", "test sentence 3", "test sentence 5"]
    assert ann.text_to_video.tolist() == [0, 1, 2]
    assert load_retrieval("msrvtt", "test-1k", tmp_path, videos).video_ids == ann.video_ids


def test_msrvtt_json_list_and_stan_dict(tmp_path, videos):
    listing = [
        {"video": "video0.mp4", "caption": ["first", "second"]},
        {"video": "video1.mp4", "caption": "third"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(listing))
    (tmp_path / "train_9k.json").write_text(
        json.dumps({"video0.mp4": ["first", "second"], "video1.mp4": ["third"]})
    )
    for name in ("train.json", "train_9k.json"):
        ann = load_caption_json(tmp_path / name, videos)
        assert ann.video_ids == ["video0.mp4", "video1.mp4"]
        assert ann.captions == ["first", "second", "third"]
        assert ann.text_to_video.tolist() == [0, 0, 1]
    assert load_retrieval("msrvtt", "any", tmp_path / "train.json", videos).captions == [
        "first",
        "second",
        "third",
    ]


# --- DiDeMo, MSVD, LSMDC, ActivityNet, generic --------------------------------------------------------------


def test_didemo_paragraph_and_split_list(tmp_path, videos):
    data = [
        {"video": "video2.avi", "description": "a man walks in ", "times": [[0, 0], [0, 1]]},
        {"video": "video0.avi", "description": "the dog barks", "times": [[1, 1]]},
        {"video": "video2.avi", "description": "he sits down", "times": [[2, 3]]},
        {"video": "video5.avi", "description": "not in this split", "times": [[0, 0]]},
    ]
    (tmp_path / "test_data.json").write_text(json.dumps(data))
    (tmp_path / "test_list.txt").write_text("video2.avi\nvideo0.avi\n")
    ann = load_didemo(tmp_path / "test_data.json", videos, tmp_path / "test_list.txt")
    # ids keep their .avi; the re-encoded .mp4 files are found
    assert ann.video_ids == ["video2.avi", "video0.avi"]
    assert ann.video_paths == [str(videos / "video2.mp4"), str(videos / "video0.mp4")]
    assert ann.captions == ["a man walks in he sits down", "the dog barks"]
    assert load_retrieval("didemo", "test", tmp_path, videos).captions == ann.captions
    sentences = load_didemo(tmp_path / "test_data.json", videos, tmp_path / "test_list.txt", paragraph=False)
    assert sentences.captions == ["a man walks in", "the dog barks", "he sits down"]
    assert sentences.text_to_video.tolist() == [0, 1, 0]


def test_msvd_caption_files_agree(tmp_path, videos):
    captions = {"video3": ["a cat plays", "a kitten is playing"], "video1": ["someone cooks", "food"]}
    (tmp_path / "test_list.txt").write_text("video3\nvideo1\n")
    lines = ["# MSVD descriptions", ""] + [f"{v} {c}" for v, cs in captions.items() for c in cs]
    (tmp_path / "AllVideoDescriptions.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    with open(tmp_path / "raw-captions.pkl", "wb") as f:  # CLIP4Clip's: lists of words
        pickle.dump({v: [c.split() for c in cs] for v, cs in captions.items()}, f)
    results = [
        load_msvd(tmp_path / "test_list.txt", tmp_path / name, videos)
        for name in ("AllVideoDescriptions.txt", "captions.json", "raw-captions.pkl")
    ]
    for ann in results:
        assert ann.video_ids == ["video3", "video1"]
        assert ann.captions == ["a cat plays", "a kitten is playing", "someone cooks", "food"]
        assert ann.text_to_video.tolist() == [0, 0, 1, 1]
    assert load_retrieval("msvd", "test", tmp_path, videos).captions == results[0].captions


def test_msvd_pickle_never_imports_classes(tmp_path, videos):
    (tmp_path / "test_list.txt").write_text("video3\n")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(OrderedDict(video3=[["a", "cat"]]), f)  # needs collections.OrderedDict to load
    with pytest.raises(DatasetError, match="collections.OrderedDict"):
        load_msvd(tmp_path / "test_list.txt", tmp_path / "evil.pkl", videos)


def test_lsmdc_tab_separated_and_nested_folders(tmp_path, videos):
    movie = tmp_path / "videos" / "1001_Movie"
    movie.mkdir(parents=True)
    for name, source in [("1001_Movie_00.01.02.000-00.01.05.000", "video0"), ("1001_Movie_00.02", "video1")]:
        (movie / f"{name}.avi").write_bytes((videos / f"{source}.mp4").read_bytes())
    rows = [
        "1001_Movie_00.01.02.000-00.01.05.000\t00.01.02.000\t00.01.05.000\t00.01.02.000\t00.01.05.000\tSOMEONE opens a door.",
        "1001_Movie_00.02\t0\t1\t0\t1\tShe smiles.",
        "1001_Movie_00.01.02.000-00.01.05.000\t0\t1\t0\t1\tHe\tleaves.",
    ]
    (tmp_path / "LSMDC16_annos_training.csv").write_text("\n".join(rows) + "\n")
    ann = load_lsmdc(tmp_path / "LSMDC16_annos_training.csv", tmp_path / "videos")
    assert ann.video_ids == ["1001_Movie_00.01.02.000-00.01.05.000", "1001_Movie_00.02"]
    assert ann.captions == ["SOMEONE opens a door.", "She smiles.", "He\tleaves."]
    assert ann.text_to_video.tolist() == [0, 1, 0]
    assert Path(ann.video_paths[1]).parent == movie
    assert load_retrieval("lsmdc", "train", tmp_path, tmp_path / "videos").captions == ann.captions


def test_activitynet_paragraph_and_prefixless_files(tmp_path, videos):
    (videos.parent / "anet").mkdir(exist_ok=True)
    anet = videos.parent / "anet"
    (anet / "abc.mp4").write_bytes((videos / "video0.mp4").read_bytes())  # CLIP4Clip names drop "v_"
    (anet / "v_xyz.mp4").write_bytes((videos / "video1.mp4").read_bytes())
    data = {
        "v_abc": {
            "duration": 20.0,
            "timestamps": [[0, 5], [5, 20]],
            "sentences": ["A man runs.", " He jumps. "],
        },
        "v_xyz": {"duration": 9.5, "timestamps": [[0, 9]], "sentences": ["A dog."]},
        "v_skip": {"duration": 3.0, "timestamps": [[0, 3]], "sentences": ["Not listed."]},
    }
    (tmp_path / "val_1.json").write_text(json.dumps(data))
    (tmp_path / "val_ids.json").write_text(json.dumps(["v_abc", "v_xyz"]))
    ann = load_activitynet(tmp_path / "val_1.json", anet, tmp_path / "val_ids.json")
    assert ann.video_ids == ["v_abc", "v_xyz"]
    assert ann.video_paths == [str(anet / "abc.mp4"), str(anet / "v_xyz.mp4")]
    assert ann.captions == ["A man runs. He jumps.", "A dog."]
    assert load_retrieval("activitynet", "val", tmp_path, anet).captions == ann.captions


def test_generic_csv_jsonl_tsv(tmp_path, videos):
    rows = [["video0.mp4", "a, quoted caption"], ["video1", "second"], ["video0.mp4", "third"]]
    _write_csv(tmp_path / "mine.csv", ["video", "caption", "extra"], [r + ["x"] for r in rows])
    (tmp_path / "mine.tsv").write_text("video\tcaption\n" + "".join(f"{v}\t{c}\n" for v, c in rows))
    (tmp_path / "mine.jsonl").write_text(
        "".join(json.dumps({"video": v, "caption": c}) + "\n" for v, c in rows)
    )
    for name in ("mine.csv", "mine.tsv", "mine.jsonl"):
        ann = load_video_captions(tmp_path / name, videos)
        assert ann.video_ids == ["video0.mp4", "video1"]
        assert ann.captions == ["a, quoted caption", "second", "third"]
        assert ann.text_to_video.tolist() == [0, 1, 0]


def test_one_dataset_table_for_recipes_and_load_retrieval(tmp_path, videos):
    """`csv` is an alias of `captions` everywhere; the recipe reader and `load_retrieval` read the same format
    under one name, and the task each name serves comes from the same table."""
    rows = [["video0.mp4", "first"], ["video1", "second"]]
    path = _write_csv(tmp_path / "mine.csv", ["video", "caption"], rows)
    files = {"split": "test", "task": "retrieval", "annotations": path, "videos": videos}
    expected = load_video_captions(path, videos).captions
    for name in ("captions", "csv"):
        assert read_split(SplitFiles(dataset=name, **files)).captions == expected
        assert load_retrieval(name, "any", path, videos).captions == expected
        assert dataset_task(name) is None
    assert set(RETRIEVAL_DATASETS) == {n for n in DATASETS if DATASETS[n].task in ("retrieval", None)}
    assert RECIPE_DATASETS == {name: dataset_task(name) for name in DATASET_NAMES}
    with pytest.raises(ConfigError, match=r"unknown retrieval dataset 'kinetics400'"):
        load_retrieval("kinetics400", "val", path, videos)
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope'; choose from msrvtt, "):
        dataset_task("nope")
    with pytest.raises(
        ConfigError, match=r"data\.captions is required for data\.dataset 'msvd' \(mine\.csv\)"
    ):
        read_split(SplitFiles(dataset="msvd", **files))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    listing = tmp_path / "list.txt"
    listing.write_text("video0.mp4 1\nvideo1.mp4 cat\n")
    recognition = {**files, "task": "recognition", "annotations": listing, "class_names": labels}
    for name in ("captions", "csv", "kinetics400"):
        assert read_split(SplitFiles(dataset=name, **recognition)).labels.tolist() == [1, 0]


# --- annotation errors name the file and the line or entry -----------------------------------------------


def test_errors_name_file_and_line(tmp_path, videos):
    bad = _write_csv(tmp_path / "a.csv", ["video", "caption"], [["video0", "fine"], ["video1", "   "]])
    with pytest.raises(DatasetError, match=r"a\.csv:3: .*empty caption"):
        load_video_captions(bad, videos)
    bad = _write_csv(tmp_path / "b.csv", ["video", "text"], [["video0", "fine"]])
    with pytest.raises(DatasetError, match=r"b\.csv:1: missing column.*caption"):
        load_video_captions(bad, videos)
    bad = _write_csv(
        tmp_path / "c.csv", ["video", "caption"], [["video0", "fine"], ["video9", "no such file"]]
    )
    with pytest.raises(DatasetError, match=r"c\.csv:3: no video file for id 'video9' under"):
        load_video_captions(bad, videos)
    (tmp_path / "d.jsonl").write_text('{"video": "video0", "caption": "ok"}\n{"video": "video1"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: missing field 'caption'"):
        load_video_captions(tmp_path / "d.jsonl", videos)
    (tmp_path / "e.json").write_text(
        '[{"video": "video0", "caption": "ok"},\n {"video": "video1", "caption": [""]}]'
    )
    with pytest.raises(DatasetError, match=r"e\.json: entry 1: caption\[0\]: empty caption"):
        load_caption_json(tmp_path / "e.json", videos)
    (tmp_path / "f.json").write_text('[{"video": "video0",\n "caption": "ok"')
    with pytest.raises(DatasetError, match=r"f\.json:2: invalid JSON"):
        load_caption_json(tmp_path / "f.json", videos)
    (tmp_path / "g.csv").write_text("clip\t0\t1\tonly four fields\n")
    with pytest.raises(DatasetError, match=r"g\.csv:1: expected 6 tab-separated fields"):
        load_lsmdc(tmp_path / "g.csv", videos)
    with pytest.raises(DatasetError, match="does not exist"):
        load_video_captions(tmp_path / "none.csv", videos)
    with pytest.raises(DatasetError, match="&nbsp;"):
        load_video_captions(
            _write_csv(tmp_path / "h.csv", ["video", "caption"], [["video0", "&nbsp;"]]), videos
        )


def test_missing_videos_can_be_skipped_and_are_listed(tmp_path, videos):
    rows = [["video0", "kept"], ["gone1", "dropped"], ["video1", "kept too"], ["gone1", "dropped again"]]
    path = _write_csv(tmp_path / "m.csv", ["video", "caption"], rows)
    ann = load_video_captions(path, videos, on_missing="skip")
    assert ann.captions == ["kept", "kept too"]
    assert len(ann.missing) == 1 and "m.csv:3" in ann.missing[0] and "gone1" in ann.missing[0]


# --- recognition annotations ----------------------------------------------------------------------------------


def _kinetics_folder(root: Path, videos: Path) -> list[tuple[str, str, int, int]]:
    clips = [
        ("riding a bike", "abcdefghijk", 14, 24),
        ("abseiling", "zyx-_123456", 0, 10),
        ("riding a bike", "q", 3, 13),
    ]
    for i, (label, yid, start, end) in enumerate(clips):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{yid}_{start:06d}_{end:06d}.mp4").write_bytes(
            (videos / f"video{i}.mp4").read_bytes()
        )
    return clips


def test_kinetics_csv_class_files_and_lists(tmp_path, videos):
    clips = _kinetics_folder(tmp_path / "k400", videos)
    _write_csv(
        tmp_path / "val.csv",
        ["label", "youtube_id", "time_start", "time_end", "split"],
        [[c[0], c[1], c[2], c[3], "val"] for c in clips],
    )
    ann = load_kinetics(tmp_path / "val.csv", tmp_path / "k400")
    assert ann.classes == ["abseiling", "riding a bike"]  # sorted label set
    assert ann.labels.tolist() == [1, 0, 1]
    assert ann.video_ids == [f"{yid}_{s:06d}_{e:06d}" for _, yid, s, e in clips]
    assert Path(ann.video_paths[0]).parent.name == "riding a bike"

    (tmp_path / "labels.txt").write_text("riding a bike\nabseiling\nsurfing\n")
    _write_csv(
        tmp_path / "labels.csv", ["id", "name"], [[1, "abseiling"], [0, "riding a bike"], [2, "surfing"]]
    )
    for classes in (tmp_path / "labels.txt", tmp_path / "labels.csv"):
        assert read_class_names(classes) == ["riding a bike", "abseiling", "surfing"]
        assert load_kinetics(tmp_path / "val.csv", tmp_path / "k400", classes).labels.tolist() == [0, 1, 0]
    with pytest.raises(DatasetError, match=r"val\.csv:2: label 'riding a bike' is not a known class"):
        load_kinetics(tmp_path / "val.csv", tmp_path / "k400", ["abseiling"])

    listing = tmp_path / "val_list.txt"
    listing.write_text(
        f"riding a bike/{clips[0][1]}_000014_000024.mp4 2\nabseiling/zyx-_123456_000000_000010.mp4 abseiling\n"
    )
    ann = load_kinetics(listing, tmp_path / "k400", ["riding a bike", "abseiling", "surfing"])
    assert ann.labels.tolist() == [2, 1]
    listing.write_text("abseiling/zyx-_123456_000000_000010.mp4 7\n")
    with pytest.raises(DatasetError, match=r"val_list\.txt:1: label 7"):
        load_kinetics(listing, tmp_path / "k400", tmp_path / "labels.txt")


def _ssv2_folder(tmp_path: Path, videos: Path) -> Path:
    labels = {"Pushing something from left to right": "0", "Putting something into something": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    entries = [
        {
            "id": "1001",
            "label": "putting a pen into a cup",
            "template": "Putting [something] into [something]",
            "placeholders": ["a pen", "a cup"],
        },
        {
            "id": "1002",
            "label": "pushing a box from left to right",
            "template": "Pushing [something] from left to right",
            "placeholders": ["a box"],
        },
    ]
    (tmp_path / "validation.json").write_text(json.dumps(entries))
    folder = tmp_path / "20bn-something-something-v2"
    folder.mkdir()
    if "vp9" in available_codecs():
        for name, seed in (("1001", 3), ("1002", 4)):
            write_video(folder / f"{name}.webm", make_frames(18, SIZE, SIZE, seed=seed), codec="vp9", gop=6)
    else:  # the finder accepts the id with any video extension
        for name, source in (("1001", "video3"), ("1002", "video4")):
            (folder / f"{name}.mp4").write_bytes((videos / f"{source}.mp4").read_bytes())
    return folder


def test_ssv2_templates_map_to_labels_and_flip_is_off(tmp_path, videos):
    folder = _ssv2_folder(tmp_path, videos)
    ann = load_ssv2(tmp_path / "validation.json", tmp_path / "labels.json", folder)
    assert ann.classes == ["Pushing something from left to right", "Putting something into something"]
    assert ann.labels.tolist() == [1, 0]
    assert ann.video_ids == ["1001", "1002"]
    assert ann.flip_safe is False
    ds = RecognitionDataset(ann, num_frames=4, train=True)
    assert ds.flip is False and ds.transform.flip is False
    item = ds[0]
    assert item["video"].shape == (4, 3, 224, 224) and item["label"] == 1

    bad = [{"id": "1001", "label": "x", "template": "Throwing [something]", "placeholders": []}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"bad\.json: entry 0.*'Throwing something'"):
        load_ssv2(tmp_path / "bad.json", tmp_path / "labels.json", folder)


# --- datasets: exact frames, tokens, views ------------------------------------------------------------------


@pytest.fixture
def msrvtt_train(tmp_path, videos):
    _msrvtt_files(tmp_path)
    return load_msrvtt(tmp_path / "MSRVTT_train.9k.csv", tmp_path / "MSRVTT_data.json", videos)


def test_retrieval_eval_items_are_the_sampled_frames(msrvtt_train):
    ds = RetrievalDataset(msrvtt_train, num_frames=12, image_size=SIZE)
    assert len(ds) == msrvtt_train.num_captions
    for index in range(len(ds)):
        item = ds[index]
        video_index = int(msrvtt_train.text_to_video[index])
        assert item["video"].shape == (12, 3, SIZE, SIZE) and item["video"].dtype == torch.float32
        n = LENGTHS[int(item["video_id"].removeprefix("video"))]
        assert _codes(item["video"]) == uniform_indices(n, 12).tolist()
        assert item["video_index"] == video_index and item["caption_index"] == index
        assert item["caption"] == msrvtt_train.captions[index]
        assert torch.equal(item["tokens"], stanvid.tokenize(item["caption"], context_length=32)[0])


def test_retrieval_video_unit_eval_and_text_tokens(msrvtt_train):
    ds = RetrievalDataset(msrvtt_train, num_frames=6, unit="video", image_size=SIZE, context_length=16)
    assert len(ds) == 3
    item = ds[1]
    assert set(item) == {"video", "video_id", "video_index", "path"} and item["video_id"] == "video0"
    tokens = ds.text_tokens()
    assert torch.equal(tokens, stanvid.tokenize(msrvtt_train.captions, context_length=16))
    assert ds.text_to_video.tolist() == msrvtt_train.text_to_video.tolist()


def test_retrieval_train_draws_frames_per_segment_and_a_caption_of_the_video(msrvtt_train):
    ds = RetrievalDataset(msrvtt_train, num_frames=8, train=True, unit="video", transform=EvalTransform(SIZE))
    seen = set()
    for _ in range(6):
        item = ds[2]  # video2: 3 captions, 33 frames
        seg = 32 / 8
        for i, code in enumerate(_codes(item["video"])):
            assert round(seg * i) <= code <= round(seg * (i + 1))
        assert msrvtt_train.text_to_video[item["caption_index"]] == 2
        seen.add(item["caption_index"])
    assert len(seen) > 1
    default = RetrievalDataset(msrvtt_train, num_frames=4, train=True)
    assert default[0]["video"].shape == (4, 3, 224, 224)  # official STAN train pipeline


def test_recognition_multi_view_items(tmp_path, videos):
    (tmp_path / "list.txt").write_text("wide.mp4 1\nvideo2.mp4 0\n")
    ann = load_kinetics(tmp_path / "list.txt", videos, ["a", "b"])
    ds = RecognitionDataset(ann, num_frames=4, num_clips=2, num_crops=3, image_size=48)
    item = ds[0]
    assert item["video"].shape == (6, 4, 3, 48, 48) and item["label"] == 1 and item["video_id"] == "wide.mp4"
    # second path: the centre crop of each clip through the plain eval transform
    inds = uniform_indices(14, 4, num_clips=2).reshape(2, 4)
    for clip in range(2):
        frames = stanvid.read_frames(videos / "wide.mp4", inds[clip].tolist(), size=48)
        assert torch.equal(item["video"][clip * 3 + 1], EvalTransform(48)(frames))
    dense = RecognitionDataset(ann, num_frames=4, sampling="dense", frame_interval=2, image_size=SIZE)
    item = dense[1]
    assert item["video"].shape == (4, 3, SIZE, SIZE)
    start = (33 - 7) // 2
    assert _codes(item["video"]) == [start, start + 2, start + 4, start + 6]


# --- broken videos: raise or skip, never substitute ------------------------------------------------------------


def _with_broken(tmp_path: Path, videos: Path):
    rows = [
        ["video0", "one"],
        ["broken.mp4", "two"],
        ["video1", "three"],
        ["video3", "four"],
        ["video4", "five"],
    ]
    return load_video_captions(_write_csv(tmp_path / "b.csv", ["video", "caption"], rows), videos)


def test_broken_video_raises_by_default(tmp_path, videos):
    ds = RetrievalDataset(_with_broken(tmp_path, videos), num_frames=4, image_size=SIZE)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        ds[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_video_skipped_and_reported(tmp_path, videos, num_workers):
    ds = RetrievalDataset(_with_broken(tmp_path, videos), num_frames=4, image_size=SIZE, on_error="skip")
    loader = make_loader(ds, batch_size=2, num_workers=num_workers, pin_memory=False)
    ids = [vid for batch in loader for vid in batch["video_id"]]
    assert ids == ["video0", "video1", "video3", "video4"]
    assert [(s.index, Path(s.path).name) for s in loader.skipped] == [(1, "broken.mp4")]
    assert "broken.mp4" in loader.skip_summary() and "1 video(s) skipped" in loader.skip_summary()
    # a batch made only of skipped items is dropped, its record kept
    only = collate_skipping([SkippedSample(3, "x.mp4", "bad")])
    assert only == {"skipped": [SkippedSample(3, "x.mp4", "bad")]}


# --- loader: seeded workers, distributed sampler -------------------------------------------------------------


def test_loader_is_reproducible_with_workers(msrvtt_train):
    ds = RetrievalDataset(msrvtt_train, num_frames=4, train=True, image_size=32)

    def run(seed: int):
        loader = make_loader(ds, batch_size=2, shuffle=True, num_workers=2, seed=seed, pin_memory=False)
        return [(batch["caption_index"].tolist(), batch["video"]) for batch in loader]

    first, again, other = run(1), run(1), run(2)
    assert [b[0] for b in first] == [b[0] for b in again]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert [b[0] for b in first] != [b[0] for b in other] or not all(
        torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True)
    )
    assert sorted(i for b in first for i in b[0]) == list(range(len(ds)))


class _GlobalRandom(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"np": float(np.random.rand()), "worker": torch.utils.data.get_worker_info().id}


def test_worker_init_seeds_numpy_per_worker():
    def run(seed: int) -> list[float]:
        loader = make_loader(
            _GlobalRandom(), batch_size=1, num_workers=2, seed=seed, persistent_workers=False
        )
        return [float(b["np"]) for b in loader]

    values = run(3)
    assert values == run(3)
    assert len(set(values)) == 4  # the two workers draw different numbers


def test_distributed_sampler_when_initialized(tmp_path, msrvtt_train):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ds = RetrievalDataset(msrvtt_train, num_frames=2, unit="video", image_size=32)
        loader = make_loader(ds, batch_size=2, shuffle=True, num_workers=0, seed=4)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.set_epoch(0)
        epoch0 = list(loader.sampler)
        loader.set_epoch(1)
        assert sorted(epoch0) == sorted(loader.sampler) == [0, 1, 2]
    finally:
        dist.destroy_process_group()

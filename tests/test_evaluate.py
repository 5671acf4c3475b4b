"""Evaluation against a second path: features computed item by item, then `retrieval_metrics` on the full
similarity matrix, `average_views` and `topk_accuracy` by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stanvid.data import RecognitionDataset, RetrievalDataset
from stanvid.data.recognition import load_kinetics
from stanvid.data.retrieval_formats import load_video_captions
from stanvid.errors import ConfigError
from stanvid.models.heads import LinearHead, encode_class_names
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.evaluate import evaluate_recognition, evaluate_retrieval, write_results, zero_shot_model
from stanvid.training.losses import text_classifier_logits
from stanvid.training.metrics import average_views, retrieval_metrics, topk_accuracy
from testkit import tiny_config
from videogen import make_frames, write_video

FRAMES, SIZE, CONTEXT = 4, 24, 16
CLASSES = ["archery", "baking bread", "climbing a rope", "diving", "eating an apple", "folding paper"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


@pytest.fixture(scope="module")
def model() -> VideoCLIP:
    torch.manual_seed(0)
    return VideoCLIP(tiny_config(frames=FRAMES, image=SIZE)).eval()


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_videos")
    for i in range(5):
        write_video(root / f"v{i}.mp4", make_frames(12, 32, 40, seed=10 + i), fps=10, gop=6)
    return root


def _retrieval_set(video_root: Path, tmp_path: Path) -> RetrievalDataset:
    # several captions per video (MSVD-like), and one video with a single caption
    rows = ["video,caption"]
    for i in range(5):
        rows += [f"v{i}.mp4,a person does thing {i}"] + ([f"v{i}.mp4,someone else at {i}"] if i % 2 else [])
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    ann = load_video_captions(tmp_path / "test.csv", video_root)
    return RetrievalDataset(ann, num_frames=FRAMES, unit="video", image_size=SIZE, context_length=CONTEXT)


def test_retrieval_matches_the_full_similarity_matrix(model, video_root, tmp_path):
    dataset = _retrieval_set(video_root, tmp_path)
    got = evaluate_retrieval(model, dataset, batch_size=2, chunk_size=2, dsl_temperature=0.05)

    with torch.inference_mode():
        videos = torch.cat([model.encode_video(dataset[i]["video"][None]) for i in range(len(dataset))])
        texts = model.encode_text(dataset.text_tokens())
    sim = F.normalize(texts, dim=-1) @ F.normalize(videos, dim=-1).T  # (texts, videos)
    ids = dataset.text_to_video
    assert sim.shape == (7, 5)
    expected = retrieval_metrics(sim, ids)
    expected_dsl = retrieval_metrics(sim, ids, dsl_temperature=0.05)
    for direction in ("t2v", "v2t"):
        assert got[direction] == pytest.approx(expected[direction])
        assert got["dsl"][direction] == pytest.approx(expected_dsl[direction])
    assert "dsl" not in evaluate_retrieval(model, dataset, dsl=False)


def test_retrieval_needs_one_item_per_video(model, video_root, tmp_path):
    dataset = _retrieval_set(video_root, tmp_path)
    dataset.unit = "caption"
    with pytest.raises(ConfigError, match="unit='video'"):
        evaluate_retrieval(model, dataset)


@pytest.fixture(scope="module")
def recognition_set(video_root, tmp_path_factory) -> RecognitionDataset:
    folder = tmp_path_factory.mktemp("labels")
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "val.txt").write_text("".join(f"v{i}.mp4 {(2 * i) % len(CLASSES)}\n" for i in range(5)))
    ann = load_kinetics(folder / "val.txt", video_root, folder / "classes.txt")
    # 2 temporal clips x 3 spatial crops = 6 views per video
    return RecognitionDataset(ann, num_frames=FRAMES, num_clips=2, num_crops=3, image_size=SIZE)


@pytest.mark.parametrize("mode", ["prob", "score"])
def test_recognition_averages_views_like_the_manual_path(model, recognition_set, mode):
    got = evaluate_recognition(
        model, recognition_set, view_average=mode, logit_scale=30.0, text_length=CONTEXT, batch_size=2
    )
    classes = encode_class_names(model, CLASSES, CONTEXT)
    rows = []
    with torch.inference_mode():
        for i in range(len(recognition_set)):
            views = recognition_set[i]["video"]  # (6, T, 3, S, S)
            assert views.shape[0] == 6
            rows.append(text_classifier_logits(model.encode_video(views), classes, 30.0))  # (6, K)
    scores = average_views(torch.cat(rows), 6, mode)
    expected = topk_accuracy(scores, recognition_set.annotations.labels, ks=(1, 5))
    assert got == pytest.approx(expected)


def test_recognition_with_a_linear_head(model, recognition_set):
    classes = encode_class_names(model, CLASSES, CONTEXT)
    head = LinearHead.from_class_features(classes, 30.0)
    with torch.no_grad():
        head.fc.bias.copy_(torch.linspace(-3, 3, len(CLASSES)))  # no longer the text classifier
    got = evaluate_recognition(model, recognition_set, head=head)
    with torch.inference_mode():
        logits = torch.cat([head(model.encode_video(recognition_set[i]["video"])) for i in range(5)])
    expected = topk_accuracy(average_views(logits, 6, "prob"), recognition_set.annotations.labels)
    assert got == pytest.approx(expected)


def test_zero_shot_model_is_the_plain_clip(model, tmp_path):
    model.save_pretrained(tmp_path / "stan")
    plain = zero_shot_model(tmp_path / "stan", num_frames=7)
    assert plain.config.temporal == "meanP" and plain.config.num_frames == 7 and plain.temporal is None
    for key, value in model.visual.state_dict().items():
        assert torch.equal(plain.visual.state_dict()[key], value)
    video = torch.randn(2, 7, 3, SIZE, SIZE)
    with torch.inference_mode():
        frames = model.encode_image(video.flatten(0, 1)).view(2, 7, -1)
        torch.testing.assert_close(plain.encode_video(video), frames.mean(1))


def test_write_results_json_and_table(tmp_path):
    metrics = {"stan": {"t2v": {"R1": 46.9, "R5": 72.8}, "dsl": {"t2v": {"R1": 49.0, "R5": 75.0}}}}
    report = {"recipe": "r", "metrics": metrics}
    path, table = write_results(report, tmp_path / "out")
    assert json.loads(path.read_text()) == report
    assert (tmp_path / "out" / "eval.txt").read_text() == table + "\n"
    lines = table.splitlines()
    assert lines[0].split() == ["R1", "R5"]
    assert lines[1].split() == ["stan/t2v", "46.9", "72.8"] and lines[2].split() == [
        "stan/dsl/t2v",
        "49.0",
        "75.0",
    ]

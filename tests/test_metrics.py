"""Metrics: the parity file, second paths (streaming vs dense, multi-caption vs brute force), recognition."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stanvid.errors import ConfigError
from stanvid.training.metrics import (
    average_views,
    chunked_similarity,
    dual_softmax,
    format_table,
    retrieval_metrics,
    retrieval_metrics_from_features,
    topk_accuracy,
)

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "retrieval_metrics.json"


def _parity_cases() -> list[dict]:
    if not PARITY.exists():
        pytest.skip(f"parity vectors not found at {PARITY}")
    return json.loads(PARITY.read_text())["cases"]


@pytest.mark.parametrize("as_torch", [False, True])
def test_retrieval_metrics_match_parity_file(as_torch):
    for case in _parity_cases():
        sim = np.array(case["sim"])
        got = retrieval_metrics(torch.from_numpy(sim) if as_torch else sim, chunk=3)
        assert got == {"t2v": case["t2v"], "v2t": case["v2t"]}


def _brute_force(sim: np.ndarray, text_to_video: np.ndarray) -> dict:
    """Ranks by sorting every row/column (ties broken against the match), then the summary statistics."""
    n_text, n_video = sim.shape
    t2v = []
    for i in range(n_text):
        # ties against the match: among equal scores the match goes last
        order = sorted(range(n_video), key=lambda j: (-sim[i, j], j == text_to_video[i]))
        t2v.append(order.index(text_to_video[i]) + 1)
    v2t = []
    for j in range(n_video):
        order = sorted(range(n_text), key=lambda i: (-sim[i, j], text_to_video[i] == j))
        v2t.append(min(order.index(i) for i in range(n_text) if text_to_video[i] == j) + 1)

    def summary(r):
        r = np.array(r)
        return {
            "R1": 100 * np.mean(r <= 1),
            "R5": 100 * np.mean(r <= 5),
            "R10": 100 * np.mean(r <= 10),
            "MdR": float(np.median(r)),
            "MnR": float(np.mean(r)),
        }

    return {"t2v": summary(t2v), "v2t": summary(v2t)}


def _assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for direction in got:
        for key, value in expected[direction].items():
            assert got[direction][key] == pytest.approx(value, rel=1e-12), (direction, key)


def test_multi_caption_against_brute_force():
    rng = np.random.default_rng(0)
    n_video = 15
    text_to_video = np.concatenate([np.arange(n_video), rng.integers(0, n_video, size=25)])
    rng.shuffle(text_to_video)
    sim = rng.normal(size=(len(text_to_video), n_video))
    sim[np.arange(len(sim)), text_to_video] += 1.0  # make the task non-trivial but not perfect
    _assert_close(retrieval_metrics(sim, text_to_video, chunk=4), _brute_force(sim, text_to_video))


def test_ties_count_against_the_match():
    sim = np.zeros((4, 4))
    got = retrieval_metrics(sim)
    _assert_close(got, _brute_force(sim, np.arange(4)))
    assert got["t2v"]["R1"] == 0.0 and got["t2v"]["MdR"] == 4.0
    # with tied captions of the same video, the video is still found first
    sim = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert retrieval_metrics(sim, [0, 0, 1])["v2t"]["R1"] == 100.0


def test_streaming_equals_dense():
    gen = torch.Generator().manual_seed(0)
    n_video, dim = 37, 16
    text_to_video = torch.cat([torch.arange(n_video), torch.randint(0, n_video, (21,), generator=gen)])
    video = torch.randn(n_video, dim, generator=gen, dtype=torch.float64)
    text = video[text_to_video] + 1.5 * torch.randn(
        len(text_to_video), dim, generator=gen, dtype=torch.float64
    )
    sim = chunked_similarity(text, video, chunk=5)
    t, v = torch.nn.functional.normalize(text, dim=-1), torch.nn.functional.normalize(video, dim=-1)
    assert torch.allclose(sim, t @ v.T, atol=1e-12)
    for dsl in (None, 0.05):
        dense = retrieval_metrics(sim, text_to_video, dsl_temperature=dsl)
        for chunk in (1, 7, 100):
            streamed = retrieval_metrics_from_features(
                text.numpy(), video, text_to_video, chunk=chunk, dsl_temperature=dsl
            )
            assert streamed == dense, (dsl, chunk)
    # square, one caption per video
    dense = retrieval_metrics(chunked_similarity(text[:n_video], video), dsl_temperature=None)
    assert retrieval_metrics_from_features(text[:n_video], video, chunk=8) == dense


def test_dual_softmax_definition_and_effect():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(6, 6))
    t2v, v2t = dual_softmax(sim, temperature=0.5)
    s = torch.from_numpy(sim)
    assert torch.allclose(t2v, s * torch.softmax(s / 0.5, dim=0))
    assert torch.allclose(v2t, s * torch.softmax(s / 0.5, dim=1))
    # a "hub" video that scores high with every text is discounted by the prior over texts
    hub = np.eye(5) * 0.5
    hub[:, 4] += 0.6
    hub[4, 4] = 0.9
    assert retrieval_metrics(hub)["t2v"]["R1"] == 20.0
    assert retrieval_metrics(hub, dsl_temperature=0.1)["t2v"]["R1"] == 100.0


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="non-square matrix needs text_to_video"):
        retrieval_metrics(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="have no caption"):
        retrieval_metrics(np.zeros((3, 3)), [0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2 dimensions"):
        retrieval_metrics(np.zeros(3))


def test_topk_accuracy_against_sorting():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 10, generator=gen)
    labels = torch.randint(0, 10, (50,), generator=gen)
    got = topk_accuracy(logits, labels, ks=(1, 3, 5))
    order = logits.argsort(dim=1, descending=True)
    for k in (1, 3, 5):
        expected = 100 * (order[:, :k] == labels[:, None]).any(1).double().mean().item()
        assert got[f"top{k}"] == pytest.approx(expected)
    assert topk_accuracy(np.zeros((2, 3)), [0, 1], ks=(1, 3)) == {"top1": 0.0, "top3": 100.0}
    with pytest.raises(ValueError, match="labels must be in"):
        topk_accuracy(logits, torch.full((50,), 10))


def test_average_views():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4 * 3, 6, generator=gen)
    prob = average_views(logits, 3)
    score = average_views(logits, 3, mode="score")
    for n in range(4):
        views = logits[3 * n : 3 * n + 3]
        assert torch.allclose(prob[n], views.softmax(-1).mean(0))
        assert torch.allclose(score[n], views.mean(0))
    with pytest.raises(ValueError, match="whole number"):
        average_views(logits, 5)
    with pytest.raises(ValueError, match="mode"):
        average_views(logits, 3, mode="max")


def test_format_table_lists_every_value():
    metrics = {
        "plain": {"t2v": {"R1": 46.9, "R5": 72.8}, "v2t": {"R1": 45.0, "R5": 70.25}},
        "dsl": {"t2v": {"R1": 49.0}},
    }
    lines = format_table(metrics).splitlines()
    assert lines[0].split() == ["R1", "R5"]
    assert lines[1].split() == ["plain/t2v", "46.9", "72.8"]
    assert lines[2].split() == ["plain/v2t", "45.0", "70.2"]
    assert lines[3].split() == ["dsl/t2v", "49.0", "-"]
    assert format_table({"top1": 84.2, "top5": 96.51}, digits=2).splitlines()[1].split() == ["84.20", "96.51"]


# ---------------------------------------------------------------------------------------------- ties
# Scores with ties of every kind: a tie of two at the top (rows 0-1), a tie below a better wrong video
# (row 2), a four-way tie (row 3), a match that is strictly best (row 4); the columns tie too.
TIED = np.array(
    [
        [0.9, 0.9, 0.1, 0.2, 0.0],
        [0.9, 0.9, 0.1, 0.2, 0.0],
        [0.1, 0.8, 0.5, 0.5, 0.5],
        [0.3, 0.3, 0.3, 0.3, 0.3],
        [0.2, 0.1, 0.0, 0.2, 0.7],
    ]
)


def _tie_break_ranks(scores: np.ndarray, match: int) -> list[int]:
    """The 1-based rank of `match` in every order of the candidates sorted by score, ties in any order."""
    ranks = []
    for order in itertools.permutations(range(len(scores))):
        if all(scores[a] >= scores[b] for a, b in itertools.pairwise(order)):
            ranks.append(order.index(match) + 1)
    return ranks


def _by_definition(sim: np.ndarray, ties: str) -> dict:
    """R@1/2/5, MdR, MnR of every tie-break order enumerated: the worst order of each query (pessimistic),
    the best (optimistic), or the average over the orders, equally likely (expected)."""

    def summary(per_query: list[list[int]]) -> dict:
        pick = {"pessimistic": max, "optimistic": min}.get(ties)
        if pick is not None:
            ranks = np.array([pick(r) for r in per_query], dtype=float)
            hits = {k: np.mean(ranks <= k) for k in (1, 2, 5)}
        else:
            ranks = np.array([np.mean(r) for r in per_query])
            hits = {k: np.mean([np.mean(np.array(r) <= k) for r in per_query]) for k in (1, 2, 5)}
        return {
            **{f"R{k}": 100 * v for k, v in hits.items()},
            "MdR": float(np.median(ranks)),
            "MnR": float(np.mean(ranks)),
        }

    t2v = [_tie_break_ranks(sim[i], i) for i in range(len(sim))]
    v2t = [_tie_break_ranks(sim[:, j], j) for j in range(sim.shape[1])]
    return {"t2v": summary(t2v), "v2t": summary(v2t)}


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "expected"])
def test_each_tie_rule_matches_its_definition(ties):
    expected = _by_definition(TIED, ties)
    _assert_close(retrieval_metrics(TIED, ties=ties, ks=(1, 2, 5), chunk=2), expected)
    # scores equal up to float rounding are ties once the tolerance covers the rounding
    nudged = TIED + np.random.default_rng(0).uniform(-1e-9, 1e-9, TIED.shape)
    _assert_close(retrieval_metrics(nudged, ties=ties, tie_tolerance=1e-6, ks=(1, 2, 5)), expected)


def test_pessimistic_is_the_default_and_the_rules_are_ordered():
    assert retrieval_metrics(TIED) == retrieval_metrics(TIED, ties="pessimistic")
    worst, mean, best = (
        retrieval_metrics(TIED, ties=t)["t2v"] for t in ("pessimistic", "expected", "optimistic")
    )
    assert worst["R1"] < mean["R1"] < best["R1"] and worst["MnR"] > mean["MnR"] > best["MnR"]
    untied = np.random.default_rng(1).normal(size=(6, 6))
    for ties in ("optimistic", "expected"):  # without ties the rules agree
        _assert_close(retrieval_metrics(untied, ties=ties), retrieval_metrics(untied))


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "expected"])
def test_tie_rules_from_features_equal_the_dense_matrix(ties):
    # integer features: every dot product is exact, so the duplicated videos tie exactly on both paths
    rng = np.random.default_rng(2)
    video = rng.integers(-3, 4, size=(6, 4)).astype(float)
    video[3] = video[1]
    text = video + rng.integers(-1, 2, size=video.shape)
    text[5] = text[0]
    dense = retrieval_metrics(text @ video.T, ties=ties)
    assert retrieval_metrics_from_features(text, video, normalize=False, chunk=4, ties=ties) == dense


@pytest.mark.parametrize(
    "kwargs, name",
    [({"ties": "random"}, "ties"), ({"tie_tolerance": -1.0}, "tie_tolerance"), ({"ks": (0,)}, "ks")],
)
def test_bad_tie_settings_are_config_errors_naming_the_argument(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        retrieval_metrics(TIED, **kwargs)
    with pytest.raises(ConfigError, match=name):
        retrieval_metrics_from_features(TIED, TIED, **kwargs)

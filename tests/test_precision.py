"""Reduced precision against float32: the resolution rules, the quality gate on a generated corpus (embedding
cosines and top-10 search overlap per precision), and the fallback to float32 on a CPU without bf16.

Which precisions exist is decided once, in `stanvid.precision`; every encode path goes through it, so the gate
is measured through the public paths (`build_index`, `open_index`, `encode_videos`/`encode_texts`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stanvid
import stanvid.precision as precision_module
from stanvid.errors import ConfigError
from stanvid.models.config import CLIPConfig, ModelConfig, STANConfig, TextConfig, VisionConfig
from stanvid.models.tokenizer import tokenize
from stanvid.precision import PRECISIONS, prepare_for_inference, resolve_precision
from stanvid.training.evaluate import encode_texts
from videogen import make_frames, write_video

faiss = pytest.importorskip("faiss")
from stanvid.search.index import build_index, open_index  # noqa: E402

GATE = {"bf16": 0.999, "fp16": 0.999, "int8": 0.99}  # minimum cosine to the float32 embedding
QUERIES = [
    f"a {colour} {thing} {motion}"
    for colour in ("red", "green", "blue", "dark")
    for thing in ("ball", "car", "person")
    for motion in ("moves left", "spins quickly")
]


def gate_model() -> stanvid.VideoCLIP:
    """Small enough for CI, deep and wide enough that rounding accumulates as in a real one (8 frames,
    49 patches per frame, a STAN branch with non-zero temporal projections)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        clip=CLIPConfig(
            embed_dim=64,
            vision=VisionConfig(width=128, layers=4, heads=4, patch_size=8, image_size=56),
            text=TextConfig(width=128, layers=3, heads=4, context_length=16),
        ),
        temporal="stan",
        num_frames=8,
        stan=STANConfig(depth=2),
    )
    model = stanvid.VideoCLIP(cfg).eval()
    with torch.no_grad():  # a trained branch has non-zero output projections; a fresh one adds nothing
        for name, p in model.named_parameters():
            if name.startswith("temporal."):
                p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, stanvid.VideoCLIP]:
    """10 generated 3-second videos (30 one-second segments) and the saved gate model."""
    root = tmp_path_factory.mktemp("precision_videos")
    for i in range(10):
        write_video(root / f"v{i:02d}.mp4", make_frames(30, 56, 72, seed=100 + i), fps=10, gop=10)
    model = gate_model()
    model_dir = tmp_path_factory.mktemp("precision_model") / "gate"
    model.save_pretrained(model_dir)
    return root, model_dir, model


@pytest.fixture(scope="module")
def indexes(corpus, tmp_path_factory) -> dict[str, Path]:
    """One index of the corpus per concrete precision."""
    root, model_dir, _ = corpus
    out = {}
    for name in ("fp32", "bf16", "fp16", "int8"):
        out[name] = tmp_path_factory.mktemp(f"idx_{name}") / "idx"
        report = build_index(
            root, out[name], model_dir, segment_seconds=1.0, num_workers=0, precision=name, progress=False
        )
        assert report.precision == name and f"built in {name}" in report.summary()
    return out


def _stored(index_dir: Path) -> dict[tuple[str, float], np.ndarray]:
    with open_index(index_dir, precision="fp32") as index:
        segments = index.segments(list(range(1, len(index) + 1)))
        vectors = index.segment_embeddings([s.id for s in segments])
    return {(s.relpath, s.start): v for s, v in zip(segments, vectors, strict=True)}


# ---------------------------------------------------------------------------------------------- resolution
def test_resolution_rules(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("int8", "cpu") == "int8"
    assert resolve_precision("bf16", "cpu") == "bf16"  # explicit: allowed, emulated without native support
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="int8 runs on the CPU only"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16, int8"):
        resolve_precision("fp8", "cpu")
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16", "int8")


def test_native_bf16_detection_is_what_torch_reports():
    caps = torch.cpu.get_capabilities()
    assert precision_module.cpu_has_native_bf16() == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def test_int8_quantizes_a_copy_and_leaves_the_model_float(corpus):
    _, _, model = corpus
    runner = prepare_for_inference(model, "int8", "cpu")
    assert runner.model is not model
    linear = runner.model.visual.blocks[0].mlp.fc1
    assert "quantized" in type(linear).__module__  # the MLP reaches its weights only through the module call
    assert isinstance(model.visual.blocks[0].mlp.fc1, torch.nn.Linear)
    assert model.visual.blocks[0].mlp.fc1.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- quality gate
@pytest.mark.parametrize("name", ["bf16", "fp16", "int8"])
def test_video_embeddings_stay_close_to_float32(indexes, name):
    reference, other = _stored(indexes["fp32"]), _stored(indexes[name])
    assert other.keys() == reference.keys() and len(reference) == 30
    for vec in other.values():
        assert vec.dtype == np.float32 and abs(np.linalg.norm(vec) - 1) < 1e-5  # stored float32, unit norm
    cos = np.array([float(reference[k] @ other[k]) for k in reference])
    assert cos.min() >= GATE[name], f"{name}: min cosine {cos.min():.5f}"


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8"])
def test_text_embeddings_stay_close_to_float32(corpus, name):
    _, _, model = corpus
    ids = tokenize(QUERIES, context_length=model.config.clip.text.context_length)
    reference = encode_texts(model, ids, precision="fp32")
    other = encode_texts(model, ids, precision=name)
    assert other.dtype == torch.float32
    cos = F.cosine_similarity(reference, other, dim=-1)
    assert cos.min() >= GATE[name], f"{name}: min cosine {cos.min():.5f}"


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8"])
def test_search_results_overlap_the_float32_index(indexes, name):
    """Each precision's index, queried in that precision, against the float32 index queried in float32."""
    with (
        open_index(indexes["fp32"], precision="fp32") as ref,
        open_index(indexes[name], precision=name) as idx,
    ):
        overlaps = []
        for query in QUERIES:
            want = {(h.relpath, h.start) for h in ref.search(query, k=10)}
            got = {(h.relpath, h.start) for h in idx.search(query, k=10)}
            overlaps.append(len(want & got) / 10)
    assert np.mean(overlaps) >= 0.9, f"{name}: mean top-10 overlap {np.mean(overlaps):.3f}"


def test_a_query_in_another_precision_searches_the_same_index(indexes):
    """Stored embeddings are float32: a bf16 index answers float32 queries, and the reverse."""
    with open_index(indexes["bf16"], precision="fp32") as index:
        assert index.build_precision == "bf16" and index.precision == "fp32"
        hits = index.search(QUERIES[0], k=5)
    with open_index(indexes["fp32"], precision="fp32") as ref:
        want = ref.search(QUERIES[0], k=5)
    assert [(h.relpath, h.start) for h in hits][:3] == [(h.relpath, h.start) for h in want][:3]


# ---------------------------------------------------------------------------------------------- fallback
def test_auto_without_native_bf16_is_float32_and_quiet(corpus, tmp_path, monkeypatch, caplog):
    root, model_dir, _ = corpus
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    caplog.set_level(logging.DEBUG, logger="stanvid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        report = build_index(
            root, tmp_path / "auto", model_dir, segment_seconds=1.0, num_workers=0, progress=False
        )
        with open_index(tmp_path / "auto") as index:
            assert index.precision == "fp32"
            hits = index.search(QUERIES[1], k=5)
    assert report.precision == "fp32"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    reference = build_index(
        root,
        tmp_path / "fp32",
        model_dir,
        segment_seconds=1.0,
        num_workers=0,
        precision="fp32",
        progress=False,
    )
    assert reference.precision == "fp32"
    auto, fp32 = _stored(tmp_path / "auto"), _stored(tmp_path / "fp32")
    assert auto.keys() == fp32.keys()
    for key in auto:
        np.testing.assert_array_equal(auto[key], fp32[key])  # identical to float32, not merely close
    with open_index(tmp_path / "fp32", precision="fp32") as index:
        assert [(h.relpath, h.start, h.score) for h in index.search(QUERIES[1], k=5)] == [
            (h.relpath, h.start, h.score) for h in hits
        ]


def test_cli_rejects_an_unknown_precision(corpus, tmp_path, capsys):
    from stanvid.cli import main

    root, model_dir, _ = corpus
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "index",
                str(root),
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "x"),
                "--precision",
                "fp8",
            ]
        )
    assert exc.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err

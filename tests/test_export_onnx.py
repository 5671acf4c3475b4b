"""ONNX export (`stanvid.export_onnx`, `stanvid export`) and the onnxruntime-backed encoder `load_model` returns
for an export folder: the second path every number is compared against is the PyTorch model itself.

The export is parametrised over what the test kit builds (`EXPORTED`): every temporal module, the STAN branch
with each time module, a Mug-STAN text head. A new backbone family adds its tiny model here and gets the same
checks (parity in fp32 and int8, fingerprint, manifest, tokenizer, index round trip).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stanvid
from indexkit import make_folder, save_tiny_model
from stanvid.checkpoints.onnx_runtime import EXPORT_MANIFEST, OnnxEncoder
from stanvid.cli import main
from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.tokenizer import tokenize
from stanvid.search.index import build_index, open_index
from testkit import tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")

FP32_RTOL = 1e-4  # the target: relative to the largest value of each output
INT8_MIN_COSINE = 0.99  # docs/speed.md: PyTorch's int8 path keeps cosine >= 0.99 to float32

# name -> tiny model; what the export must handle (a new family or temporal module adds a line)
EXPORTED = {
    "stan": lambda: tiny_model("stan", seed=1),
    "stan-conv": lambda: tiny_model("stan", seed=2, time_module="conv"),
    "meanP": lambda: tiny_model("meanP", seed=3),
    "seqTransf": lambda: tiny_model("seqTransf", seed=4),
    "mug": lambda: tiny_model("stan", seed=5, similarity="mug"),
}


def _trained_like(model: nn.Module) -> nn.Module:
    """Give the zero-initialised temporal projections weights, so the branch changes the output."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("temporal.") and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module", params=sorted(EXPORTED))
def exported(request, tmp_path_factory) -> tuple[str, nn.Module, Path]:
    model = _trained_like(EXPORTED[request.param]())
    out = tmp_path_factory.mktemp(f"onnx-{request.param}") / "export"
    stanvid.export_onnx(model, out)
    return request.param, model, out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _inputs(model, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = model.config
    size, frames = cfg.clip.vision.image_size, cfg.num_frames
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, frames, 3, size, size, generator=gen)  # (B, T, 3, H, W)
    images = torch.randn(batch, 3, size, size, generator=gen)
    captions = ["a cat", "someone slices bread on a wooden board", "rain", "two kids kick a ball", "x y z"]
    ids = tokenize(captions[:batch], context_length=cfg.clip.text.context_length)
    return video, images, ids


@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_embeddings_match_pytorch(exported, batch):
    """Every output of every graph within 1e-4 (relative) of PyTorch's, at batch sizes the trace never saw."""
    name, model, out = exported
    encoder = stanvid.load_model(out)
    assert isinstance(encoder, OnnxEncoder) and encoder.precision == "fp32"
    video, images, ids = _inputs(model, batch, seed=batch)
    with torch.no_grad():
        pairs = [
            (encoder.encode_video(video), model.encode_video(video)),
            (encoder.encode_video(video, pool=False), model.encode_video(video, pool=False)),
            (encoder.encode_image(images), model.encode_image(images)),
            (encoder.encode_text(ids), model.encode_text(ids)),
        ]
        if name == "mug":  # per-token text features, also at a shorter length (padded inside)
            pairs.append((encoder.encode_text(ids, pool=False), model.encode_text(ids, pool=False)))
            pairs.append(
                (encoder.encode_text(ids[:, :9], pool=False), model.encode_text(ids[:, :9], pool=False))
            )
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == torch.float32
        assert _rel(got, want) <= FP32_RTOL, (name, _rel(got, want))


def test_the_export_reports_the_models_fingerprint_and_everything_a_client_needs(exported):
    name, model, out = exported
    encoder = stanvid.load_model(out)
    assert stanvid.model_fingerprint(encoder) == stanvid.model_fingerprint(model)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    cfg = model.config
    assert manifest["frames"] == cfg.num_frames and manifest["frames_dynamic"] is False
    assert manifest["input_size"] == cfg.clip.vision.image_size
    assert manifest["preprocess"]["mean"] == list(cfg.clip.preprocess.mean)
    assert manifest["preprocess"]["std"] == list(cfg.clip.preprocess.std)
    assert manifest["context_length"] == cfg.clip.text.context_length
    assert manifest["pooling"]["rule"] == cfg.pooling
    assert manifest["similarity"]["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["check"]["batch"] == 3  # the run before success, at a batch the trace did not see
    for file, size in manifest["files"].items():
        assert (out / file).stat().st_size == size
    assert encoder.config == cfg
    # the shipped tokenizer gives the library's ids
    texts = ["A man is Cooking pasta!", "&amp; émigré café", ""]
    assert torch.equal(encoder.tokenize(texts), tokenize(texts, context_length=cfg.clip.text.context_length))


def test_int8_stays_within_the_documented_tolerance(exported):
    """onnxruntime's dynamic int8 (`for_precision("int8")`, what `--precision int8` runs) keeps cosine >= 0.99
    to PyTorch's float32, the bound PyTorch's own int8 path is held to."""
    name, model, out = exported
    runner = stanvid.prepare_for_inference(stanvid.load_model(out), "int8", "cpu")
    assert runner.precision == "int8" and runner.model.precision == "int8"
    video, images, ids = _inputs(model, 4, seed=11)
    with torch.no_grad():
        for got, want in (
            (runner.model.encode_video(video), model.encode_video(video)),
            (runner.model.encode_image(images), model.encode_image(images)),
            (runner.model.encode_text(ids), model.encode_text(ids)),
        ):
            assert float(F.cosine_similarity(got, want).min()) >= INT8_MIN_COSINE, name
            assert not torch.equal(got, want)  # it really ran quantized


@pytest.mark.slow
def test_int8_and_fp16_export_folders(tmp_path):
    model = _trained_like(EXPORTED["stan"]())
    video, _, ids = _inputs(model, 2, seed=5)
    for precision, bound in (("int8", INT8_MIN_COSINE), ("fp16", 0.999)):
        manifest = stanvid.export_onnx(model, tmp_path / precision, precision=precision)
        assert manifest["precision"] == precision
        encoder = stanvid.load_model(tmp_path / precision)
        with torch.no_grad():
            assert (
                float(F.cosine_similarity(encoder.encode_video(video), model.encode_video(video)).min())
                >= bound
            )
            assert float(F.cosine_similarity(encoder.encode_text(ids), model.encode_text(ids)).min()) >= bound


# ---------------------------------------------------------------------------------------------- refusals
def test_a_temporal_module_the_exporter_does_not_handle_is_refused_by_name(tmp_path):
    model = tiny_model("meanP")
    model.temporal = nn.Identity()
    with pytest.raises(CheckpointError, match="temporal module Identity"):
        stanvid.export_onnx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_bad_options_and_a_used_folder(tmp_path):
    model = tiny_model("meanP")
    with pytest.raises(ConfigError, match="precision"):
        stanvid.export_onnx(model, tmp_path / "a", precision="bf16")
    with pytest.raises(ConfigError, match="opset"):
        stanvid.export_onnx(model, tmp_path / "a", opset=11)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not an empty folder"):
        stanvid.export_onnx(model, tmp_path / "used")
    with pytest.raises(CheckpointError, match="non-float32"):
        stanvid.export_onnx(tiny_model("meanP").half(), tmp_path / "b")


def _copy(exported, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(exported[2], dst)
    return dst


@pytest.mark.parametrize("exported", ["meanP"], indirect=True)
def test_a_damaged_or_foreign_export_is_refused_naming_the_file(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    (folder / "text_encoder.onnx").unlink()
    with pytest.raises(CheckpointError, match="text_encoder.onnx: missing"):
        stanvid.load_model(folder)
    folder = _copy(exported, tmp_path / "b")
    with open(folder / "video_encoder.onnx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="video_encoder.onnx: 100 bytes"):
        stanvid.load_model(folder)
    folder = _copy(exported, tmp_path / "c")
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    manifest["format_version"] = 99
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"stanvid_export.json: format_version 99"):
        stanvid.load_model(folder)
    with pytest.raises(ConfigError, match="num_frames"):
        stanvid.load_model(exported[2], num_frames=3)
    manifest["format_version"] = 1
    manifest["files"]["../outside"] = 1
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the export folder"):
        stanvid.load_model(folder)


@pytest.mark.parametrize("exported", ["stan"], indirect=True)
def test_wrong_inputs_name_the_expected_shape(exported):
    encoder = stanvid.load_model(exported[2])
    cfg = encoder.config
    with pytest.raises(ValueError, match="frames fixed at export"):
        encoder.encode_video(torch.zeros(1, cfg.num_frames + 1, 3, 24, 24))
    with pytest.raises(ValueError, match="token ids"):
        encoder.encode_text(torch.zeros(1, cfg.clip.text.context_length + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="per-token"):
        encoder.encode_text(tokenize(["a"], context_length=cfg.clip.text.context_length), pool=False)


def test_cli_export_set_bad_value_is_one_line_naming_the_key(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "out"), "--set", "num_frames=abc"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "num_frames" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- in use
@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> dict[str, Path]:
    """A folder of generated videos, the index tests' model saved, and an index built with each runtime."""
    base = tmp_path_factory.mktemp("onnx-index")
    videos = make_folder(base / "videos")
    model_dir = save_tiny_model(base / "model")
    out = {"videos": videos, "model": model_dir}
    for runtime in ("torch", "onnxruntime"):
        out[runtime] = base / f"idx-{runtime}"
        build_index(
            videos,
            out[runtime],
            model_dir,
            runtime=runtime,
            segment_seconds=1.0,
            num_workers=0,
            precision="fp32",
            progress=False,
        )
    return out


def test_an_index_built_with_one_runtime_searches_with_the_other(indexed):
    with (
        open_index(indexed["torch"], precision="fp32") as a,
        open_index(indexed["onnxruntime"], precision="fp32") as b,
    ):
        assert a.meta["model_fingerprint"] == b.meta["model_fingerprint"]
        assert a.meta["model_source"] == b.meta["model_source"] == str(indexed["model"].resolve())
        ids = list(range(1, len(a) + 1))
        va, vb = a.segment_embeddings(ids), b.segment_embeddings(ids)
    assert _rel(torch.from_numpy(vb), torch.from_numpy(va)) <= FP32_RTOL
    query = "a red square moves to the right"
    for built in ("torch", "onnxruntime"):
        hits = {}
        for runtime in ("torch", "onnxruntime"):
            with open_index(indexed[built], precision="fp32", runtime=runtime) as index:
                assert isinstance(index.model, OnnxEncoder) == (runtime == "onnxruntime")
                hits[runtime] = index.search(query, k=5)
        assert [h.id for h in hits["torch"]] == [h.id for h in hits["onnxruntime"]]
        for x, y in zip(hits["torch"], hits["onnxruntime"], strict=True):
            assert x.score == pytest.approx(y.score, abs=1e-5)


def test_cli_export_then_search_by_the_export_folder(indexed, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(indexed["model"]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnx.checker passed" in printed and "video_encoder.onnx" in printed
    index = tmp_path / "idx"
    assert (
        main(
            [
                "index",
                str(indexed["videos"]),
                "--model",
                str(out),
                "--out",
                str(index),
                "--no-progress",
                "--segment-seconds",
                "1",
                "--workers",
                "0",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    capsys.readouterr()
    # built by the export, searched by the PyTorch model it records it came from
    assert main(["search", str(index), "a red square", "--runtime", "torch", "--json", "-k", "3"]) == 0
    by_torch = json.loads(capsys.readouterr().out)
    assert main(["search", str(index), "a red square", "--json", "-k", "3"]) == 0
    by_onnx = json.loads(capsys.readouterr().out)
    assert [h["path"] for h in by_torch] == [h["path"] for h in by_onnx] and len(by_onnx) == 3
    assert main(["export", str(indexed["model"]), str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the demo
def demo_retrieval_check(model_dir: Path, data: Path, export: Path) -> dict[str, dict[str, float]]:
    """On the demo's two test sets, the PyTorch model and its fp32 export: the largest score difference, and
    that every caption ranks the clips in the same order (PyTorch's scores taken in onnxruntime's order are
    non-increasing, up to ties closer than twice that difference)."""
    from stanvid.data import RetrievalDataset, load_video_captions
    from stanvid.demo import evaluate as ev
    from stanvid.training.evaluate import encode_texts, encode_videos
    from stanvid.video.transforms import EvalTransform

    model = stanvid.load_model(model_dir)
    stanvid.export_onnx(model_dir, export)
    encoder = stanvid.load_model(export)
    cfg = model.config
    found = {}
    for kind in ("appearance", "order"):
        dataset = RetrievalDataset(
            load_video_captions(data / f"test_{kind}.csv", data / "videos"),
            num_frames=cfg.num_frames,
            train=False,
            unit="video",
            transform=EvalTransform(cfg.clip.vision.image_size),
            context_length=cfg.clip.text.context_length,
        )
        sims = {}
        for name, m in (("torch", model), ("onnxruntime", encoder)):
            videos = encode_videos(m, dataset, batch_size=16, precision="fp32", device="cpu")  # (N, D)
            texts = encode_texts(m, dataset.text_tokens(), precision="fp32", device="cpu")  # (Q, D)
            sims[name] = F.normalize(texts.double(), dim=-1) @ F.normalize(videos.double(), dim=-1).T
        want, got = sims["torch"], sims["onnxruntime"]
        error = float((got - want).abs().max())
        ranked = want.gather(1, got.argsort(dim=1, descending=True))  # (Q, N)
        same_order = bool((ranked[:, 1:] <= ranked[:, :-1] + 2 * error + ev.TIE_TOLERANCE).all())
        recall = {n: ev.expected_recall(v, dataset.text_to_video)["R@1"] for n, v in sims.items()}
        found[kind] = {"error": error, "same_order": same_order, **recall}
    return found


@pytest.mark.slow
def test_demo_retrieval_order_is_unchanged_in_fp32(demo_run, tmp_path):
    out, _ = demo_run
    for kind, found in demo_retrieval_check(out / "model", out / "data", tmp_path / "export").items():
        assert found["error"] < 1e-4 and found["same_order"], (kind, found)
        assert found["torch"] == found["onnxruntime"], (kind, found)


@pytest.mark.parametrize("family", ["siglip_hf_a", "siglip2_openclip_a", "pecore_openclip_a"])
@pytest.mark.parametrize("temporal", ["stan", "meanP"])
def test_every_backbone_family_exports_with_its_own_tokenizer(parity, tmp_path, family, temporal):
    """SigLIP (Hugging Face), SigLIP 2 and PE-Core (open_clip) references, with STAN and meanP on top:
    onnxruntime's embeddings within 1e-4 (relative) of PyTorch's, and the export's tokenizer (its own file
    shipped beside the graphs) gives the model's ids for the reference's multilingual captions."""
    folder = parity(family)
    extra = {"stan_depth": 2} if temporal == "stan" else {}
    model = stanvid.load_model(folder, temporal=temporal, num_frames=4, **extra).eval()
    stanvid.export_onnx(model, tmp_path / "out")
    encoder = stanvid.load_model(tmp_path / "out")
    captions = json.loads((folder / "meta.json").read_text())["captions"]
    ids = model.tokenize(captions)
    assert torch.equal(encoder.tokenize(captions), ids)
    size = model.config.clip.vision.image_size
    video = torch.randn(2, 4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pairs = [
            (encoder.encode_video(video), model.encode_video(video)),
            (encoder.encode_text(ids), model.encode_text(ids)),
        ]
    for got, want in pairs:
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-4

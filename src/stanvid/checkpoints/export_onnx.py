"""`export_onnx`: a stanvid model as three ONNX graphs plus the manifest a client in any language needs.

The folder (`stanvid export MODEL OUT`):

    video_encoder.onnx    frames (B, T, 3, H, W) float32, normalized -> video_embeds (B, D), frame_embeds (B, T, D)
    image_encoder.onnx    images (B, 3, H, W) float32, normalized    -> image_embeds (B, D)
    text_encoder.onnx     input_ids (N, L) int64, L = context length -> text_embeds (N, D)
                          (a Mug-STAN model also gives token_embeds (N, L, D), what its head scores)
    tokenizer/            the tokenizer's files, as the manifest describes them
    stanvid_export.json   fingerprint, frames, input size, preprocessing, tokenizer, pooling, logit scale and
                          bias, opset, precision, the versions that wrote it, every file with its size

The graphs are written by `torch.onnx.export(..., dynamo=True)` (torch's default exporter since 2.9): it goes
through `torch.export`, which traces the batch as a symbolic dimension and raises if any code specialises it,
where the TorchScript exporter records whatever Python computed from the example batch as a constant and can
produce a graph that is silently wrong at another batch size. Batch (B, N) is dynamic; the frame count is fixed
at export to the model's `num_frames` (the STAN branch reshapes by T in Python, and a fixed T is what every
client sends anyway), and so is the text length (the context length: pad with the pad id).

Nothing here depends on a backbone family: the graphs are the model's own `encode_video` / `encode_image` /
`encode_text` and `pool`, the manifest is read from its config, and the tokenizer describes itself
(`stanvid.models.tokenizer.export_tokenizer`). Before anything is reported, every graph passes `onnx.checker`
and is run once in onnxruntime on a batch of another size than the export's, against the PyTorch model
(fp32: within `FP32_RTOL`, relative to the largest output; fp16 / int8: cosine within the bounds the precision
docs give PyTorch's own half and int8 paths); the figures are recorded under `check` in the manifest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stanvid.checkpoints.download import cache_dir
from stanvid.checkpoints.fingerprint import model_fingerprint
from stanvid.checkpoints.onnx_runtime import (
    EXPORT_FORMAT,
    EXPORT_MANIFEST,
    GRAPH_FILES,
    TOKENIZER_DIR,
    OnnxEncoder,
    import_onnx,
    import_onnxruntime,
    quantize_graph,
)
from stanvid.errors import CheckpointError, ConfigError
from stanvid.fileio import atomic_write_text, publish_folder
from stanvid.models.stan import STANBranch
from stanvid.models.temporal import SeqTransformer
from stanvid.models.tokenizer import export_tokenizer
from stanvid.models.video_clip import VideoCLIP

__all__ = ["DEFAULT_OPSET", "EXPORT_PRECISIONS", "check_exportable", "onnx_encoder_for", "write_export"]

log = logging.getLogger("stanvid")

EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_OPSET = (
    18  # the lowest the dynamo exporter writes; onnxruntime >= 1.14, TensorRT 8.6 and OpenVINO read it
)
FP32_RTOL = 1e-4  # max |onnx - torch| / max |torch|, per output
MIN_COSINE = {"fp16": 0.999, "int8": 0.99}  # as docs/speed.md bounds PyTorch's fp16 and int8 against fp32
_EXPORT_BATCH, _CHECK_BATCH = 2, 3  # the check runs another batch size than the trace saw
_EXTERNAL_DATA_BYTES = (
    1_800_000_000  # protobuf's 2 GB limit: bigger graphs keep their weights in a .data file
)
# the temporal modules the exporter traces and checks; anything else is refused by name
_TEMPORAL_TYPES: tuple[type, ...] = (type(None), STANBranch, SeqTransformer)


# ---------------------------------------------------------------------------------------------- public API
def write_export(
    model: VideoCLIP,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    source: str = "",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `model` as an ONNX export folder at `out` (module docstring); returns its manifest. `source` and
    `overrides` are what it was loaded from, recorded for `load_model(out, runtime="torch")`. `load_model(out)`
    reads it back as an onnxruntime-backed encoder with the same encoding API and fingerprint
    (`stanvid.export_onnx` is this for any model source).

    `precision`: `fp32` (the reference), `fp16` (weights and arithmetic in half, float32 inputs and outputs:
    for GPUs and TensorRT; on a CPU onnxruntime casts back to float32 where it has no half kernel) or `int8`
    (onnxruntime's dynamic quantization of every MatMul: int8 weights, activations quantized per batch).
    `out` must not exist or be an empty folder; the folder appears complete or not at all.
    """
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    onnx = import_onnx()
    if (
        isinstance(opset, bool)
        or not isinstance(opset, int)
        or not 18 <= opset <= onnx.defs.onnx_opset_version()
    ):
        raise ConfigError(
            f"opset must be an integer from 18 (the exporter's lowest) to {onnx.defs.onnx_opset_version()} "
            f"(this onnx's highest), got {opset!r}"
        )
    check_exportable(model)
    overrides = dict(overrides or {})
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty folder; export into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        manifest = _write_export(model, stage, opset, precision, source, overrides)
        if out.exists():
            out.rmdir()  # empty, checked above
        publish_folder(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def onnx_encoder_for(model: VideoCLIP, opset: int = DEFAULT_OPSET) -> OnnxEncoder:
    """The onnxruntime-backed twin of `model`: its fp32 export, written once per model (by fingerprint) under
    `$STANVID_CACHE/onnx/` and read from there afterwards (what `load_model(..., runtime="onnxruntime")` and
    the commands' `--runtime onnxruntime` use). A cached folder that does not load is exported again."""
    fingerprint = model_fingerprint(model)
    folder = cache_dir() / "onnx" / f"{fingerprint[:32]}-opset{opset}"
    encoder = _cached(folder, fingerprint)
    if encoder is not None:
        return encoder
    shutil.rmtree(folder, ignore_errors=True)
    log.info("exporting the model to ONNX once, into %s", folder)
    try:
        write_export(model, folder, opset=opset)
    except (OSError, CheckpointError):
        encoder = _cached(folder, fingerprint)  # another process exported it at the same time
        if encoder is None:
            raise
        return encoder
    return OnnxEncoder.from_folder(folder)


def check_exportable(model: Any) -> None:
    """Refuse, by name, a model the exporter does not handle (it would trace, or be checked, wrongly)."""
    if isinstance(model, OnnxEncoder):
        raise CheckpointError(
            f"{model.folder}: already an ONNX export; export the PyTorch model it came from"
        )
    if not isinstance(model, VideoCLIP):
        raise CheckpointError(
            f"cannot export a {type(model).__name__}: export_onnx takes a stanvid VideoCLIP"
        )
    if not isinstance(model.temporal, _TEMPORAL_TYPES):
        raise CheckpointError(
            f"cannot export temporal module {type(model.temporal).__name__}: the ONNX exporter handles meanP, "
            f"seqTransf and STAN ({', '.join(t.__name__ for t in _TEMPORAL_TYPES[1:])})"
        )
    odd = sorted({f"{n} ({p.dtype})" for n, p in model.state_dict().items() if p.dtype != torch.float32})
    if odd:
        raise CheckpointError(
            f"cannot export a model with non-float32 tensors ({', '.join(odd[:3])}): export the float32 model "
            f"and ask for --precision fp16 or int8"
        )
    unknown = sorted({type(m).__name__ for m in model.modules() if "quantized" in type(m).__module__})
    if unknown:
        raise CheckpointError(
            f"cannot export quantized modules ({', '.join(unknown)}): export the float32 model with "
            f"--precision int8 instead"
        )


# ---------------------------------------------------------------------------------------------- steps
@dataclass
class _Example:
    """The inputs a graph is traced with and checked on."""

    export: tuple[torch.Tensor, ...]
    check: tuple[torch.Tensor, ...]


def _write_export(
    model: VideoCLIP, stage: Path, opset: int, precision: str, source: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Every file of the export into `stage`: graphs, tokenizer, manifest; then the check, into the manifest."""
    model = model.eval()
    graphs, examples = _graphs(model)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    for name, graph in graphs.items():
        path = stage / GRAPH_FILES[name]
        traced = path if precision == "fp32" else path.with_name(path.name + ".fp32")
        _export_graph(graph, examples[name].export, traced, opset, external, name)
        if precision != "fp32":
            _convert(traced, path, precision, external)
    clip = model.config.clip
    spec, files = export_tokenizer(
        clip.text.context_length, clip.tokenizer, getattr(model.tokenizer, "files", None)
    )
    (stage / TOKENIZER_DIR).mkdir()
    for name, data in files.items():
        (stage / TOKENIZER_DIR / name).write_bytes(data)
    manifest = _manifest(model, graphs, opset, precision, source, overrides, spec)
    manifest["files"] = {
        p.relative_to(stage).as_posix(): p.stat().st_size for p in sorted(stage.rglob("*")) if p.is_file()
    }
    atomic_write_text(stage / EXPORT_MANIFEST, _json(manifest))
    manifest["check"] = _check(model, graphs, examples, stage, precision)
    atomic_write_text(stage / EXPORT_MANIFEST, _json(manifest))
    return manifest


class _VideoGraph(nn.Module):
    def __init__(self, model: VideoCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_frame = self.model.encode_video(frames, pool=False)  # (B, T, D)
        return self.model.pool(per_frame), per_frame


class _ImageGraph(nn.Module):
    def __init__(self, model: VideoCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)  # (B, D)


class _TextGraph(nn.Module):
    """Pooled text embeddings; with `tokens`, also every position's (Mug-STAN's head needs them)."""

    def __init__(self, model: VideoCLIP, tokens: bool) -> None:
        super().__init__()
        self.model = model
        self.tokens = tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.encode_text(input_ids)  # (N, D)
        if not self.tokens:
            return pooled
        return pooled, self.model.encode_text(input_ids, pool=False)  # (N, L, D)


GRAPH_IO = {
    "video": (("frames",), ("video_embeds", "frame_embeds")),
    "image": (("images",), ("image_embeds",)),
    "text": (("input_ids",), ("text_embeds",)),
}


def _outputs(name: str, model: VideoCLIP) -> tuple[str, ...]:
    outputs = GRAPH_IO[name][1]
    return outputs + ("token_embeds",) if name == "text" and model.config.similarity == "mug" else outputs


def _graphs(model: VideoCLIP) -> tuple[dict[str, nn.Module], dict[str, _Example]]:
    """The three graphs' modules and their inputs: seeded normalized-range frames and real captions."""
    cfg = model.config
    size, frames = cfg.clip.vision.image_size, cfg.num_frames
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device

    def clips(b: int) -> torch.Tensor:
        return torch.randn(b, frames, 3, size, size, generator=gen).to(device)  # (B, T, 3, H, W)

    captions = ["a person is cooking", "a dog runs on the beach", "two people play tennis in the rain"]
    ids = model.tokenize(captions).to(device)  # (3, L): the model's own tokenizer, whatever its family
    graphs = {
        "video": _VideoGraph(model),
        "image": _ImageGraph(model),
        "text": _TextGraph(model, cfg.similarity == "mug"),
    }
    examples = {
        "video": _Example((clips(_EXPORT_BATCH),), (clips(_CHECK_BATCH),)),
        "image": _Example((clips(_EXPORT_BATCH)[:, 0],), (clips(_CHECK_BATCH)[:, 0],)),
        "text": _Example((ids[:_EXPORT_BATCH],), (ids[:_CHECK_BATCH],)),
    }
    return graphs, examples


def _export_graph(graph: nn.Module, args: tuple, path: Path, opset: int, external: bool, name: str) -> None:
    """One graph through the dynamo exporter, dimension 0 of its input dynamic (module docstring)."""
    model = graph.model
    inputs, outputs = GRAPH_IO[name][0], _outputs(name, model)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a line per missing optional package (torchvision), a page per graph
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),  # the exporter prints its progress
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=True,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=external,
            )
    except Exception as exc:  # torch.export raises many types; the user needs the graph and the reason
        module = type(model.temporal).__name__ if model.temporal is not None else "meanP"
        raise CheckpointError(
            f"cannot export {path.name} of this model (temporal module {module}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        quiet.setLevel(level)


def _convert(tmp: Path, path: Path, precision: str, external: bool) -> None:
    """The float32 graph at `tmp` as `path` in `precision`, then `tmp` removed. fp16: weights and arithmetic in
    half with float32 inputs and outputs kept; int8: onnxruntime's dynamic quantization (int8 weights per
    tensor, activations quantized per batch), as PyTorch's int8 path does."""
    onnx = import_onnx()
    import_onnxruntime()
    try:
        if precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16
            from onnxruntime.transformers.onnx_model import OnnxModel

            half = OnnxModel(convert_float_to_float16(onnx.load(str(tmp)), keep_io_types=True))
            half.topological_sort()  # the input casts it adds come after their users (onnx.checker refuses)
            data = path.with_name(path.name + ".data")
            onnx.save(half.model, str(path), save_as_external_data=external, location=data.name)
        else:
            quantize_graph(tmp, path, external)
    finally:
        tmp.unlink()
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)


def _manifest(
    model: VideoCLIP,
    graphs: dict[str, nn.Module],
    opset: int,
    precision: str,
    source: str,
    overrides: dict[str, Any],
    tokenizer: dict[str, Any],
) -> dict[str, Any]:
    """`stanvid_export.json`: everything a client needs, nothing it must guess."""
    cfg = model.config
    size, frames, dim = cfg.clip.vision.image_size, cfg.num_frames, cfg.clip.embed_dim
    length = cfg.clip.text.context_length
    prep = cfg.clip.preprocess
    bias = getattr(model, "logit_bias", None)
    shapes = {
        "frames": ["batch", frames, 3, size, size],
        "video_embeds": ["batch", dim],
        "frame_embeds": ["batch", frames, dim],
        "images": ["batch", 3, size, size],
        "image_embeds": ["batch", dim],
        "input_ids": ["batch", length],
        "text_embeds": ["batch", dim],
        "token_embeds": ["batch", length, dim],
    }
    dtype = {"input_ids": "int64"}
    return {
        "format": "stanvid-onnx-export",
        "format_version": EXPORT_FORMAT,
        "model_fingerprint": model_fingerprint(model),
        "model_source": source,
        "model_overrides": dict(overrides),
        "model_config": cfg.to_dict(),
        "precision": precision,
        "opset": opset,
        "graphs": {
            name: {
                "file": GRAPH_FILES[name],
                "inputs": {
                    k: {"shape": shapes[k], "dtype": dtype.get(k, "float32")} for k in GRAPH_IO[name][0]
                },
                "outputs": {k: {"shape": shapes[k], "dtype": "float32"} for k in _outputs(name, model)},
            }
            for name in graphs
        },
        "frames": frames,
        "frames_dynamic": False,
        "frames_note": f"fixed at export: send exactly {frames} frames per clip (export again with "
        f"--set num_frames=N for another count, up to what the temporal module's position table holds)",
        "input_size": size,
        "preprocess": {
            "frame_sampling": f"{frames} frames sampled uniformly over the clip (stanvid.video.sampling."
            "uniform_indices, mode test)",
            "resize_mode": "shortest",
            "resize": f"shortest side to {size} pixels, aspect kept",
            "interpolation": "bicubic",
            "antialias": True,
            "crop": f"centre crop {size}x{size}",
            "channels": "RGB",
            "scale": "x / 255",
            "mean": list(prep.mean),
            "std": list(prep.std),
            "formula": "(x / 255 - mean[c]) / std[c] per channel c, layout channels-first",
        },
        "context_length": length,
        "tokenizer": {
            **tokenizer,
            "files": {k: f"{TOKENIZER_DIR}/{v}" for k, v in tokenizer["files"].items()},
        },
        "pooling": {
            "rule": cfg.pooling,
            "description": "video_embeds = mean over frames of frame_embeds"
            + (" after each is L2-normalized" if cfg.pooling == "normalized_mean" else " as they are"),
        },
        "embed_dim": dim,
        "normalized_outputs": False,
        "similarity": {
            "kind": cfg.similarity,
            "rule": "logit_scale * cosine(text, video)"
            + (" + logit_bias" if bias is not None else "")
            + (
                "; Mug-STAN re-ranks with its head on token_embeds and frame_embeds"
                if cfg.similarity == "mug"
                else ""
            ),
            "logit_scale": float(model.logit_scale.detach().exp()),
            "log_logit_scale": float(model.logit_scale.detach()),
            "logit_bias": None if bias is None else float(torch.as_tensor(bias).detach()),
        },
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import importlib.metadata

    onnx, ort = import_onnx(), import_onnxruntime()
    try:  # the installed distribution's version (the package namespace sits above this layer)
        version = importlib.metadata.version("stanvid")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    versions = {
        "stanvid": version,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(ImportError):
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    return versions


def _check(
    model: VideoCLIP,
    graphs: dict[str, nn.Module],
    examples: dict[str, _Example],
    stage: Path,
    precision: str,
) -> dict[str, Any]:
    """`onnx.checker` on every graph, then one run each in onnxruntime against PyTorch (module docstring)."""
    onnx = import_onnx()
    report: dict[str, Any] = {"batch": _CHECK_BATCH}
    encoder = OnnxEncoder.from_folder(stage)
    for name, graph in graphs.items():
        path = stage / GRAPH_FILES[name]
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # onnx raises ValidationError and InferenceError
            raise CheckpointError(f"{path.name}: rejected by onnx.checker: {exc}") from exc
        with torch.no_grad():
            want = graph(*examples[name].check)
        got = encoder.run_graph(name, *examples[name].check)
        want = want if isinstance(want, tuple) else (want,)
        for out, a, b in zip(_outputs(name, model), got, want, strict=True):
            report[out] = _agreement(path.name, out, a, b.float().cpu(), precision)
    return report


def _agreement(file: str, output: str, got: torch.Tensor, want: torch.Tensor, precision: str) -> dict:
    if got.shape != want.shape:
        raise CheckpointError(f"{file}: {output} has shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}")
    rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    cos = float(
        F.cosine_similarity(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]), -1).min()
    )
    if precision == "fp32" and not rel <= FP32_RTOL:
        raise CheckpointError(
            f"{file}: {output} differs from PyTorch by {rel:.2e} of its largest value (> {FP32_RTOL:.0e})"
        )
    if precision != "fp32" and not cos >= MIN_COSINE[precision]:
        raise CheckpointError(
            f"{file}: {output} has cosine {cos:.5f} to PyTorch's float32 (< {MIN_COSINE[precision]} for {precision})"
        )
    return {"max_relative_difference": rel, "min_cosine": cos}


def _cached(folder: Path, fingerprint: str) -> OnnxEncoder | None:
    """The cached export in `folder` if it loads and is the model's; None otherwise."""
    if not (folder / EXPORT_MANIFEST).is_file():
        return None
    try:
        encoder = OnnxEncoder.from_folder(folder)
    except (CheckpointError, ConfigError) as exc:
        log.info("%s: cached export not used (%s)", folder, exc)
        return None
    return encoder if encoder.recorded_fingerprint == fingerprint and encoder.precision == "fp32" else None


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"

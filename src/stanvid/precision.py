"""Inference precision: one setting for every encode path (evaluation, indexing, search, serving).

    resolved = resolve_precision("auto", device)             # "fp32" | "bf16" | "fp16" | "int8"
    runner = prepare_for_inference(model, "auto", device)    # what to call, and how
    with runner.autocast():
        emb = runner.model.encode_video(video).float()

The names users type:

- ``auto`` (the default for inference): bf16 autocast on a CPU with native bf16 arithmetic (AVX512_BF16 or AMX,
  as torch reports it), bf16 autocast on a GPU that supports it (fp16 on older ones), float32 anywhere else.
- ``fp32``: what the model was trained in; the reference every other precision is tested against.
- ``bf16`` / ``fp16``: `torch.autocast` on the model's device: matmuls and convolutions in half precision,
  reductions and layer norms in float32. On a CPU without native support they still run, emulated and slower.
- ``int8`` (CPU only): dynamic quantization of every `nn.Linear` (int8 weights per tensor, activations quantized
  per batch) through `torch.ao.quantization.quantize_dynamic`; the model is copied, the caller's stays float32.
  torchao (0.18) was measured as the alternative: its eager int8 linear ran at about half the float32 speed on
  our CPU (it needs `torch.compile` to be fast), where torch's own dynamic linear runs at about 3x.

Embeddings leave every path as float32 (callers `.float()` them), so indexes built in one precision are searched
with queries encoded in another: the tests bound how far each precision moves an embedding from float32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from stanvid.errors import ConfigError

log = logging.getLogger("stanvid")

__all__ = [
    "PRECISIONS",
    "InferencePrecision",
    "autocast",
    "cpu_has_native_bf16",
    "cpu_has_native_fp16",
    "prepare_for_inference",
    "quantize_int8",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512_BF16 or AMX-BF16), as torch detects it.

    Without it, oneDNN emulates bf16 matmuls and autocast is slower than float32, so `auto` stays in float32.
    """
    caps = _cpu_capabilities()
    if caps is not None:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def cpu_has_native_fp16() -> bool:
    """True when this CPU computes fp16 natively (AVX512_FP16 or AMX-FP16), as torch detects it; without it
    fp16 autocast on the CPU is emulated (correct, and slower than float32)."""
    caps = _cpu_capabilities()
    return bool(caps is not None and (caps.get("avx512_fp16") or caps.get("amx_fp16")))


def _cpu_capabilities() -> dict | None:
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    try:
        return dict(get()) if get is not None else None
    except RuntimeError:  # cpuinfo could not read this CPU
        return None


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete precision (``fp32``, ``bf16``, ``fp16`` or ``int8``) that ``precision`` means on ``device``.

    Raises `ConfigError` for an unknown name, ``int8`` off the CPU, or a half precision the GPU cannot run.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "int8":
            raise ConfigError(
                "precision int8 runs on the CPU only; use bf16 or fp16 on CUDA (or --device cpu)"
            )
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision bf16 is not supported on this GPU; use fp16 or fp32")
        return precision
    if device.type == "cpu":
        if precision == "auto":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return precision
    if precision in ("auto", "fp32"):  # mps, xpu, ...: nothing here is tested on them
        return "fp32"
    raise ConfigError(f"precision {precision} is supported on cpu and cuda, not on {device.type}")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """`torch.autocast` for a resolved ``bf16``/``fp16`` on ``device``; a no-op for ``fp32`` and ``int8``."""
    dtype = _HALF.get(precision)
    if dtype is None:
        if precision not in PRECISIONS or precision == "auto":
            raise ConfigError(
                f"autocast needs a resolved precision (fp32, bf16, fp16, int8), got {precision!r}"
            )
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every `nn.Linear` dynamically quantized to int8 (CPU); ``model`` is untouched.

    Convolutions (the patch embedding), embeddings and layer norms stay float32. torch marks its eager
    quantization API deprecated; its warnings are silenced here, once, since the API is the fast one on CPU
    (see the module docstring).
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=".*deprecated.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        quantized = quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)
    return quantized


@dataclass(frozen=True)
class InferencePrecision:
    """A model ready to encode at one precision: ``model`` (the original, or its int8 copy) and the autocast
    to wrap its calls in. Outputs of ``model`` are float32 for fp32/int8 and half for bf16/fp16: ``.float()``
    them."""

    model: nn.Module
    precision: str  # resolved: fp32, bf16, fp16, int8
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)


def prepare_for_inference(
    model: nn.Module, precision: str = "auto", device: torch.device | str | None = None
) -> InferencePrecision:
    """Resolve ``precision`` on ``device`` (default: where the model's parameters are) and prepare ``model`` for
    it: int8 quantizes a copy, the other precisions use ``model`` itself.

    A model of another runtime (an ONNX export's encoder, which has ``for_precision``) runs its own graphs: it
    is asked for its ``precision`` twin (int8: its graphs quantized), and the runner reports the precision it
    really computes in."""
    for_precision = getattr(model, "for_precision", None)
    if for_precision is not None:
        resolve_precision(precision, device if device is not None else "cpu")  # a bad name still fails
        runner = for_precision(precision)
        return InferencePrecision(runner, runner.precision, torch.device("cpu"))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    resolved = resolve_precision(precision, device)
    if resolved == "int8":
        model = quantize_int8(model)
    return InferencePrecision(model, resolved, device)

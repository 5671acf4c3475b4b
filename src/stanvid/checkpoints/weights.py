"""Weights into memory once: a safetensors file read tensor by tensor into the tensors a model keeps, and a
model built without initialising what its checkpoint overwrites.

`safetensors.torch.load_file` maps the file: its tensors are views of one shared mapping, so a model that
copies them into its own (randomly initialised) parameters holds the weights twice until the mapping goes (a
191M-parameter model peaked at 1.68 GiB to load 0.76 GB), and a model that kept the mapped tensors would
crash (SIGBUS) when the file is truncated under it. `read_safetensors` reads each tensor with `readinto`
into a tensor of its own (anonymous memory, nothing mapped), and `assign_state` makes those tensors the
parameters of a model constructed on the meta device (no memory, no random init:
`load_state_dict(assign=True)`): the weights are in memory once, and loading costs one read of the file.

The file is read through one descriptor whose `fstat` before and after the read must agree: the identity it
returns (`stanvid.fileio.settled_identity`) is then that of the bytes read, which is what lets a caller cache
something computed from them (`stanvid.search.index.identity`'s fingerprint cache).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from stanvid.errors import CheckpointError
from stanvid.fileio import settled_identity

__all__ = ["read_safetensors", "assign_state", "on_meta"]

# safetensors dtype names -> torch dtypes read directly; any other (fp8, unsigned wide ints) goes through
# `safetensors.torch.load_file` (mapped, then copied once by `assign_state`)
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], list[int] | None]:
    """The tensors of a safetensors file, each in memory of its own, and the file's settled identity (None
    when it changed while read, or too recently to be trusted: `stanvid.fileio.settled_identity`)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            layout = _layout(f, before.st_size, path)
            if layout is None:  # a dtype read here does not know, or a big-endian machine
                return _load_mapped(path), None
            state = {name: _read_tensor(f, *spec, path=path) for name, spec in layout.items()}
            after = os.fstat(f.fileno())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from exc
    identity = settled_identity(before)  # it holds the size; None while the file is too recent to trust
    return state, identity if identity == settled_identity(after) else None


def _layout(f, size: int, path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]] | None:
    """name -> (dtype, shape, first byte, end byte) from the header, checked as the safetensors library
    checks it (offsets inside the file, sizes matching the shapes, no two tensors overlapping)."""
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: cannot read safetensors (the file is {size} bytes)")
    n = int.from_bytes(head, "little")
    if n > min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{path}: cannot read safetensors (header of {n} bytes in a {size}-byte file)")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors (its header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: cannot read safetensors (its header is not a JSON object)")
    header.pop("__metadata__", None)
    base, out, spans = 8 + n, {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(
                f"{path}: cannot read safetensors (tensor {name!r}: malformed entry {entry!r})"
            )
        if dtype not in _DTYPES or sys.byteorder != "little":
            return None
        want = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != want or base + end > size:
            raise CheckpointError(
                f"{path}: cannot read safetensors (tensor {name!r}: bytes {begin}..{end} for {want} bytes of "
                f"{dtype} {shape}, in a file of {size - base} data bytes)"
            )
        out[name] = (_DTYPES[dtype], shape, base + begin, base + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path}: cannot read safetensors (tensors {a!r} and {b!r} overlap)")
    return out


def _read_tensor(
    f, dtype: torch.dtype, shape: list[int], begin: int, end: int, *, path: Path
) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    if end == begin:
        return tensor
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    f.seek(begin)
    while view:
        got = f.readinto(view)
        if not got:
            raise CheckpointError(f"{path}: cannot read safetensors (the file ended inside a tensor)")
        view = view[got:]
    return tensor


def _load_mapped(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from exc


class _SkipMetaInit(TorchFunctionMode):
    """Random draws onto meta tensors do nothing: a meta tensor has no values to draw, and torch's meta
    kernels for `normal_` and `randn` import torch._dynamo and sympy (over a second) to draw none."""

    _INITS = frozenset({torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.Tensor.normal_})
    _DRAWS = frozenset({torch.randn, torch.rand})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INITS:
            tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        if func in self._DRAWS and torch.device(kwargs.get("device") or "meta").type == "meta":
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules built inside are built on the meta device: shapes only, no memory, no initialisation drawn
    (this thread only: torch's device context and function modes are per thread)."""
    with torch.device("meta"), _SkipMetaInit():
        yield


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool | None:
    """Make `state` the parameters and buffers of `model`, built on the meta device (`with
    torch.device("meta")`: no memory, no random init). Returns whether every tensor was taken as given (no
    dtype cast), or None, leaving `model` as it was, when `state` does not name every tensor of the model or
    the model shares one tensor between two names: the caller then builds the model and copies.

    A tensor is taken as is when it owns its memory; a view (of a mapped file, of a larger tensor, of a
    transposed matrix) is copied first, so no parameter aliases another or a file. Keys and shapes are the
    caller's to have checked (`stanvid.checkpoints.convert.check_converted` lists every mismatch)."""
    expected = model.state_dict(keep_vars=True)
    every = dict(model.named_parameters(remove_duplicate=False))
    every |= dict(model.named_buffers(remove_duplicate=False))
    # every tensor in the state dict (no non-persistent buffer to make), each under one name only
    if not set(every) == set(expected) == set(state) or len({id(t) for t in every.values()}) != len(every):
        return None
    if any(state[k].shape != t.shape for k, t in expected.items()):
        return None
    ready, seen, exact = {}, set(), True
    for key, value in state.items():
        if value.dtype != expected[key].dtype:
            value, exact = value.to(expected[key].dtype), False
        storage = value.untyped_storage()
        owned = (
            value.is_contiguous()
            and value.storage_offset() == 0
            and storage.nbytes() == value.numel() * value.element_size()
            and storage.data_ptr() not in seen
            and value.device.type == "cpu"
            and not value.requires_grad
        )
        if not owned:
            value = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        seen.add(value.untyped_storage().data_ptr())
        ready[key] = value
    model.load_state_dict(ready, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"weights left unassigned after loading: {', '.join(left)}")
    return exact

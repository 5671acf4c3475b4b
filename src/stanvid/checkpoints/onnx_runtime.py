"""An ONNX export folder (`stanvid.export_onnx`) as an encoder with the library's encoding API, run by onnxruntime.

`load_model(folder)` returns an `OnnxEncoder`: `encode_video`, `encode_image`, `encode_text` and `tokenize` take
and give torch tensors as `VideoCLIP`'s do, `config` is the exported model's `ModelConfig`, and its fingerprint
(`stanvid.model_fingerprint`) is the one the export recorded, that of the PyTorch model it came from: an index
built with either runtime is searched with the other. Each graph's session is created on first use (a search
needs only the text graph). `for_precision("int8")` of an fp32 export quantizes its graphs as they are loaded
(onnxruntime's dynamic quantization), which is what `--precision int8` means for this runtime; the other
precisions run the graphs as exported.

A folder is read only if its manifest has this stanvid's export format and every file it lists is there with
the size it lists; anything else is refused with the file's name. onnx and onnxruntime are optional (the
`onnx` extra): without them the error says what to install.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.config import ModelConfig
from stanvid.models.text_tokenizers import read_exported_tokenizer
from stanvid.models.video_clip import pool_frames

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_MANIFEST",
    "GRAPH_FILES",
    "RUNTIMES",
    "OnnxEncoder",
    "quantize_graph",
    "read_export_manifest",
]

RUNTIMES = ("torch", "onnxruntime")  # what `load_model(runtime=...)` and `--runtime` take
EXPORT_MANIFEST = "stanvid_export.json"
EXPORT_FORMAT = 1  # a change to the files or their meaning changes this, and older folders are refused
GRAPH_FILES = {"video": "video_encoder.onnx", "image": "image_encoder.onnx", "text": "text_encoder.onnx"}
TOKENIZER_DIR = "tokenizer"
_REQUIRED = ("model_fingerprint", "model_config", "precision", "graphs", "files", "tokenizer", "frames")


def import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError("ONNX export needs the onnx package: pip install 'stanvid[onnx]'") from exc
    return onnx


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("the onnxruntime runtime needs onnxruntime: pip install 'stanvid[onnx]'") from exc
    return onnxruntime


def read_export_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder, checked: this stanvid's format, every listed file present at its
    size. Raises `CheckpointError` naming the file that is wrong."""
    folder = Path(folder)
    path = folder / EXPORT_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a stanvid ONNX export folder") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "stanvid-onnx-export":
        raise CheckpointError(f"{path}: not a stanvid ONNX export manifest")
    found = manifest.get("format_version")
    if found != EXPORT_FORMAT:
        made_by = (manifest.get("versions") or {}).get("stanvid", "an unknown version")
        raise CheckpointError(
            f"{path}: format_version {found!r} (written by stanvid {made_by}); this stanvid reads "
            f"format_version {EXPORT_FORMAT}: export the model again with this version"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: files must map each file to its size")
    for name in list(GRAPH_FILES.values()) + [f"{TOKENIZER_DIR}/{f}" for f in _tokenizer_files(manifest)]:
        if name not in files:
            raise CheckpointError(f"{path}: files does not list {name}")
    for name, size in files.items():
        file = (folder / name).resolve()
        if name.startswith(("/", "\\")) or ".." in Path(name).parts or folder.resolve() not in file.parents:
            raise CheckpointError(f"{path}: file {name!r} is outside the export folder")
        if not file.is_file():
            raise CheckpointError(f"{folder / name}: missing (listed in {EXPORT_MANIFEST})")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{folder / name}: {file.stat().st_size} bytes, {EXPORT_MANIFEST} lists {size}; the export is "
                f"damaged or was changed: export again"
            )
    return manifest


def _tokenizer_files(manifest: dict[str, Any]) -> list[str]:
    files = manifest["tokenizer"].get("files") if isinstance(manifest["tokenizer"], dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{EXPORT_MANIFEST}: tokenizer.files must name the tokenizer's files")
    return [Path(v).name for v in files.values()]


class OnnxEncoder:
    """The encoding API of `VideoCLIP` over an export folder's graphs (module docstring). CPU only."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict[str, Any], quantize: bool = False) -> None:
        self.folder = folder
        self.manifest = manifest
        where = f"{folder / EXPORT_MANIFEST}: model_config"
        if not isinstance(manifest["model_config"], dict):
            raise CheckpointError(f"{where} must be an object")
        self.config = ModelConfig.from_dict(manifest["model_config"])
        self.recorded_fingerprint: str = str(manifest["model_fingerprint"])
        self.exported_precision: str = manifest["precision"]
        self.precision = "int8" if quantize else self.exported_precision
        self._quantize = quantize
        scale = manifest.get("similarity", {})
        self.logit_scale = torch.tensor(float(scale.get("log_logit_scale", 0.0)))
        bias = scale.get("logit_bias")
        self.logit_bias = None if bias is None else torch.tensor(float(bias))
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tokenizer = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> OnnxEncoder:
        folder = Path(folder).expanduser()
        return cls(folder, read_export_manifest(folder))

    # ------------------------------------------------------------------ the nn.Module calls callers make
    def eval(self) -> OnnxEncoder:
        return self

    def train(self, mode: bool = True) -> OnnxEncoder:
        if mode:
            raise ConfigError(f"{self.folder}: an ONNX export is for inference; train the PyTorch model")
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxEncoder:
        """The graphs run on the CPU whatever the device; outputs come back on the inputs' device."""
        return self

    def for_precision(self, precision: str) -> OnnxEncoder:
        """int8 of an fp32 export: a twin whose graphs are dynamically quantized as they load; any other
        precision runs the graphs as exported (autocast has no meaning for them)."""
        if precision == "int8" and self.exported_precision == "fp32":
            return OnnxEncoder(self.folder, self.manifest, quantize=True)
        return self

    # ------------------------------------------------------------------ encoders
    def encode_video(self, video: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """(B, T, 3, H, W) normalized frames -> (B, D), or per-frame (B, T, D) with `pool=False`."""
        t, size = self.config.num_frames, self.config.clip.vision.image_size
        if video.dim() != 5 or tuple(video.shape[1:]) != (t, 3, size, size):
            raise ValueError(
                f"video must be (B, {t}, 3, {size}, {size}) for this export (frames fixed at export), got shape "
                f"{tuple(video.shape)}"
            )
        pooled, per_frame = self.run_graph("video", video)
        return pooled if pool else per_frame

    def pool(self, per_frame: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D) by the exported model's pooling rule, as `VideoCLIP.pool`."""
        return pool_frames(per_frame, self.config.pooling)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, D)."""
        size = self.config.clip.vision.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be (B, 3, {size}, {size}), got shape {tuple(images.shape)}")
        return self.run_graph("image", images)[0]

    def encode_text(self, ids: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """(N, L) token ids -> (N, D); per-token (N, L, D) with `pool=False` (Mug-STAN exports only). Shorter
        rows are padded to the context length (causal attention: the padding changes no earlier position)."""
        length = self.config.clip.text.context_length
        if ids.dim() != 2 or ids.shape[1] > length:
            raise ValueError(f"token ids must be (N, L) with L <= {length}, got shape {tuple(ids.shape)}")
        seq = ids.shape[1]
        padded = F.pad(ids, (0, length - seq)) if seq < length else ids
        outputs = self.run_graph("text", padded)
        if pool:
            return outputs[0]
        if len(outputs) < 2:
            raise ConfigError(
                f"{self.folder}: this export has no per-token text output (only Mug-STAN models export one)"
            )
        return outputs[1][:, :seq]

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """Texts -> (N, context length) token ids, with the tokenizer files shipped in the export."""
        if self._tokenizer is None:
            self._tokenizer = read_exported_tokenizer(self.manifest["tokenizer"], self.folder)
        return self._tokenizer([texts] if isinstance(texts, str) else list(texts))

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cosine similarity (+ logit_bias where the model has one), (N, D) x (M, D) -> (N, M)."""
        sims = self.logit_scale.exp() * F.normalize(text_emb, dim=-1) @ F.normalize(video_emb, dim=-1).t()
        return sims if self.logit_bias is None else sims + self.logit_bias

    def run_graph(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One graph's outputs for one input, as float32 tensors on the input's device."""
        if x.shape[0] == 0:
            raise ValueError(f"{GRAPH_FILES[name]}: an empty batch")
        session = self._session(name)
        feed = x.detach().cpu()
        feed = feed.long() if name == "text" else feed.float()
        outputs = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(feed.numpy())})
        return tuple(torch.from_numpy(np.asarray(o, dtype=np.float32)).to(x.device) for o in outputs)

    def _session(self, name: str) -> Any:
        with self._lock:
            session = self._sessions.get(name)
            if session is None:
                session = self._sessions[name] = self._open(self.folder / GRAPH_FILES[name])
            return session

    def _open(self, path: Path) -> Any:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores PyTorch would use
        options.log_severity_level = 3
        try:
            if not self._quantize:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return ort.InferenceSession(_quantized(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise CheckpointError(
                f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})"
            ) from exc

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.folder)!r}, precision={self.precision!r})"


def quantize_graph(src: Path, dst: Path, external: bool = False) -> None:
    """onnxruntime's dynamic int8 quantization of every MatMul of the graph at `src` into `dst` (int8 weights
    per tensor, activations quantized per batch), as PyTorch's int8 path (`stanvid.quantize_int8`) does."""
    import_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # it logs advice on its pre-processing (shape inference) there, every call
    advice = _DropAdvice()
    root.addFilter(advice)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=external)
    finally:
        root.removeFilter(advice)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


def _quantized(path: Path) -> bytes:
    """The graph at `path` quantized (`quantize_graph`), as bytes for a session."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        quantize_graph(path, out)
        return out.read_bytes()

"""Each model's own tokenizer: CLIP's BPE, SigLIP's SentencePiece, or a `tokenizer.json`.

Every tokenizer here is called as `tokenizer(texts, context_length=...) -> LongTensor (N, context_length)` and
knows the files it was read from (`files`: name -> bytes), which `save_pretrained` writes beside the weights so
that a saved folder reloads with the same ids. The maintained `sentencepiece` and `tokenizers` libraries do the
subword work; what is written here is only the text handling around them that the references add:

- `SentencePieceTokenizer` gives the ids of Hugging Face's `SiglipTokenizer(texts, padding="max_length",
  truncation=True)`: special-token strings in the text kept as their ids, every other stretch lower-cased,
  stripped of ASCII punctuation and of repeated whitespace, encoded without SentencePiece's dummy prefix except
  at the start of the text, end-of-text appended (unless the text already ends with it), cut to the context
  with end-of-text last, padded with the pad id.
- `JSONTokenizer` gives open_clip's `HFTokenizer` ids: its `clean` mode (`canonicalize`: ftfy, HTML
  unescaping, `_` to space, punctuation removed, lower case, whitespace collapsed; `lower`; `whitespace`), or
  none (`none`, transformers' behaviour for a Hugging Face folder), then the `tokenizer.json`'s own normalizer,
  pre-tokenizer and templates, truncated to the context and padded with the pad token.
"""

from __future__ import annotations

import html
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import ftfy
import torch

from stanvid.errors import ConfigError
from stanvid.models.config import TokenizerConfig
from stanvid.models.tokenizer import default_tokenizer, exported_tokenizer

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPIECE_UNDERLINE = "\u2581"


class TextTokenizer(Protocol):
    files: dict[str, bytes]

    def __call__(self, texts: str | Sequence[str], context_length: int) -> torch.Tensor: ...


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return out


def _check_context(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ConfigError(f"context_length must be an integer >= 2, got {context_length!r}")
    return context_length


class CLIPTokenizer:
    """CLIP's BPE (`stanvid.tokenize`): shipped with stanvid, so it has no files of its own."""

    files: dict[str, bytes] = {}

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        return default_tokenizer()(texts, context_length=context_length)


def clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


class ModelTokenizer:
    """A model's `tokenize` on its own: picklable (datasets in DataLoader workers take it) and small (the
    tokenizer, not the model). `fixed_context`: the context a tower pooled at the last position always gets."""

    def __init__(self, tokenizer: TextTokenizer, default_context: int, fixed_context: int | None) -> None:
        self.tokenizer, self.default_context, self.fixed_context = tokenizer, default_context, fixed_context

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if self.fixed_context is not None:
            context_length = self.fixed_context
        elif context_length is None:
            context_length = self.default_context
        return self.tokenizer(texts, context_length=context_length)


class _FromBytes:
    """Tokenizers rebuilt from their file bytes when copied or pickled (the native objects are not)."""

    def __getstate__(self) -> dict:
        return {"args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["args"])


def _siglip_clean(text: str, lower: bool) -> str:
    if lower:
        text = text.lower()
    return " ".join(text.translate(_PUNCTUATION).split())


class SentencePieceTokenizer(_FromBytes):
    """SigLIP's tokenizer (see the module docstring) on a SentencePiece model given as bytes."""

    def __init__(self, cfg: TokenizerConfig, model: bytes, where: str = "spiece.model") -> None:
        self._args = (cfg, model, where)
        try:
            import sentencepiece
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ConfigError(f"{where}: SigLIP's tokenizer needs `pip install sentencepiece`") from exc
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model)
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"{where}: not a SentencePiece model ({exc})") from exc
        self.cfg = cfg
        self.files = {cfg.file: model}
        names = {"eos_token": cfg.eos_token or "</s>", "pad_token": cfg.pad_token or "</s>"}
        names["unk_token"] = cfg.unk_token or "<unk>"
        ids = {}
        for field, piece in names.items():
            ids[field] = self.sp.piece_to_id(piece)
            if self.sp.id_to_piece(ids[field]) != piece:
                raise ConfigError(f"{where}: TokenizerConfig.{field} {piece!r} is not in the vocabulary")
        self.eos_id, self.pad_id = ids["eos_token"], ids["pad_token"]
        self.unk = names["unk_token"]
        self.unk_length = len(self.sp.encode(self.unk, out_type=str))
        self.special = {names["eos_token"], names["pad_token"], names["unk_token"]}
        self._split = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")"
        )

    def encode(self, text: str) -> list[int]:
        """Ids of one text without end-of-text or padding."""
        text = _SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ")
        pieces: list[str] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # a special token written in the text
                pieces.append(part)
                continue
            part = _siglip_clean(part, self.cfg.lower)
            if part:  # encoded after the unknown token, then that dropped: no dummy prefix mid-text
                found = self.sp.encode(self.unk + part, out_type=str)
                pieces += found[self.unk_length :] if len(found) >= self.unk_length else found
        if len(pieces) > 1 and pieces[0] == _SPIECE_UNDERLINE and pieces[1] in self.special:
            pieces = pieces[1:]
        return [self.sp.piece_to_id(p) for p in pieces]

    def __call__(self, texts: str | Sequence[str], context_length: int = 64) -> torch.Tensor:
        context_length = _check_context(context_length)
        texts = _as_list(texts)
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)  # (N, L)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: context_length - 1]
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


_CLEANS = {
    "canonicalize": lambda t: " ".join(
        _basic_clean(t).replace("_", " ").translate(_PUNCTUATION).lower().split()
    ),
    "lower": lambda t: " ".join(_basic_clean(t).split()).lower(),
    "whitespace": lambda t: " ".join(_basic_clean(t).split()),
    "none": lambda t: t,
}


class JSONTokenizer(_FromBytes):
    """A `tokenizer.json` through the `tokenizers` library, after open_clip's clean mode (module docstring)."""

    def __init__(self, cfg: TokenizerConfig, data: bytes, where: str = "tokenizer.json") -> None:
        self._args = (cfg, data, where)
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ConfigError(f"{where}: this tokenizer needs `pip install tokenizers`") from exc
        try:
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # UnicodeDecodeError, or the Rust library's plain Exception on a bad file
            raise ConfigError(
                f"{where}: not a readable tokenizer.json ({type(exc).__name__}: {exc})"
            ) from exc
        pad = cfg.pad_token or "<pad>"
        self.pad_id = self.tokenizer.token_to_id(pad)
        if self.pad_id is None:
            raise ConfigError(f"{where}: pad token {pad!r} is not in the vocabulary")
        self.pad = pad
        self.clean = _CLEANS[cfg.clean]
        self.files = {cfg.file: data}
        self._context = None

    def __call__(self, texts: str | Sequence[str], context_length: int = 64) -> torch.Tensor:
        context_length = _check_context(context_length)
        texts = [self.clean(t) for t in _as_list(texts)]
        if self._context != context_length:
            self.tokenizer.enable_truncation(max_length=context_length)
            self.tokenizer.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=self.pad)
            self._context = context_length
        rows = [e.ids for e in self.tokenizer.encode_batch(texts)]
        return torch.tensor(rows, dtype=torch.long).view(len(texts), context_length)


def build_tokenizer(cfg: TokenizerConfig, files: dict[str, bytes], where: str = "") -> TextTokenizer:
    """The tokenizer a `TokenizerConfig` describes, on the file bytes it names (`files[cfg.file]`)."""
    if cfg.kind == "clip":
        return CLIPTokenizer()
    if cfg.file not in files:
        raise ConfigError(
            f"{where or 'model'}: the {cfg.kind} tokenizer needs its file {cfg.file}, which is missing"
        )
    label = f"{where}/{cfg.file}" if where else cfg.file
    if cfg.kind == "sentencepiece":
        return SentencePieceTokenizer(cfg, files[cfg.file], label)
    return JSONTokenizer(cfg, files[cfg.file], label)


def read_exported_tokenizer(spec: dict, folder: Path) -> Callable[[Sequence[str]], torch.Tensor]:
    """The tokenizer an ONNX export describes (`stanvid.models.tokenizer.export_tokenizer`), on the files shipped
    beside its graphs: a family's own (`sentencepiece`, `hf`, rebuilt from its `TokenizerConfig`) or CLIP's BPE."""
    if spec.get("kind") in ("sentencepiece", "hf"):
        cfg = TokenizerConfig(**spec["config"])
        data = (folder / spec["files"]["model"]).read_bytes()
        tok = build_tokenizer(cfg, {cfg.file: data}, str(folder))
        length = int(spec["context_length"])
        return lambda texts: tok(texts, context_length=length)
    return exported_tokenizer(spec, folder)

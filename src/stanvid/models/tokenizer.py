"""CLIP's byte-level BPE tokenizer, id-for-id equal to OpenAI's ``clip.tokenize``.

The text cleaning, the pre-tokenizing pattern, the merges and the special ids are OpenAI's
(``clip/simple_tokenizer.py``): ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed, lower case,
``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407, zero padding. Two things differ on purpose:

* Over-long text is cut so that the last kept id is end-of-text, and truncation is the default. The official
  STAN pipeline instead keeps the first 32 of 77 ids, which drops end-of-text for captions longer than 30 BPE
  tokens, so the text tower pools at a wrong position (``shared/parity/README.md``, "Known quirks").
* It is several times faster. OpenAI's per-caption cost is dominated by ``ftfy.fix_text``; most captions are
  plain ASCII, for which every ftfy fix is the identity once ``&`` (HTML entities), ANSI escapes and control
  characters other than tab/newline/carriage return are ruled out. Such text takes a fast path (``str.split``
  whitespace collapse and the stdlib ``re`` with an ASCII form of the pattern); anything else takes OpenAI's
  path unchanged. Ids are cached per pre-token (and, on the fast path, per space-separated chunk), so BPE
  and the pattern run once per distinct word.
  ``SimpleTokenizer.encode_reference`` keeps the straightforward path, and the tests pin both to each other.

As in the reference, literal ``<|startoftext|>`` / ``<|endoftext|>`` inside a caption become the special ids.
An empty caption tokenizes to ``[start, end]``, as in the reference; dataset code should reject such captions
with :func:`is_empty_caption` rather than train on them.
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from importlib import resources
from itertools import pairwise
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

from stanvid.errors import ConfigError
from stanvid.models.config import TokenizerConfig

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

# OpenAI keeps merges[1 : 49152 - 256 - 2 + 1]: the vocabulary is 256 bytes, the same 256 as word ends,
# 48894 merges and the two special tokens, 49408 entries in all.
_NUM_MERGES = 49152 - 256 - 2

# OpenAI's pre-tokenizer (applied to lower-cased text, IGNORECASE kept as in the reference).
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The same pattern for lower-cased ASCII text whose whitespace is already collapsed to single spaces:
# there \p{L} is [a-z], \p{N} is [0-9] and the only whitespace is " ".
_ASCII_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+"""
)
_WHITESPACE = regex.compile(r"\s+")
# Characters that keep ASCII text off the fast path: ftfy drops control characters (and ANSI escapes, which
# start with \x1b) and '&' may start an HTML entity. Tab, newline and carriage return are whitespace that the
# collapse turns into " " whether or not ftfy has normalised line breaks first.
_NOT_FAST = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")

_DEFAULT_CACHE_SIZE = 1 << 18


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, soft hyphen...) map to
    U+0100 onwards, so every byte string is a string of visible characters that BPE can merge.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    # Insertion order is the vocabulary order: the kept bytes first, then the remapped ones.
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _default_vocab_bytes() -> bytes:
    return (resources.files("stanvid") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()


def _is_fast_path_text(text: str) -> bool:
    """True when ``ftfy.fix_text`` and ``html.unescape`` cannot change ``text`` (see the module docstring)."""
    if not text.isascii() or "&" in text:
        return False
    return text.isprintable() or _NOT_FAST.search(text) is None


def _clean_reference(text: str) -> str:
    """OpenAI's ``whitespace_clean(basic_clean(text)).lower()``, step for step."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = _WHITESPACE.sub(" ", text)
    return text.strip().lower()


def clean_text(text: str) -> str:
    """The text that BPE sees: ftfy-fixed, HTML-unescaped twice, whitespace collapsed, lower case."""
    if _is_fast_path_text(text):
        return " ".join(text.split()).lower()
    return _clean_reference(text)


class SimpleTokenizer:
    """CLIP's byte-level BPE (OpenAI ``SimpleTokenizer``) with a fast path and a per-word cache.

    ``bpe_path`` is a gzip merges file in OpenAI's format; by default the one shipped in ``stanvid/assets``.
    ``cache_size`` bounds each of the two caches (ids per pre-token, and per space-separated chunk of plain
    ASCII text); a full cache is emptied and refilled, so a long-running server that sees arbitrary text does
    not grow without limit.
    """

    def __init__(self, bpe_path: str | Path | None = None, cache_size: int = _DEFAULT_CACHE_SIZE) -> None:
        raw = _default_vocab_bytes() if bpe_path is None else Path(bpe_path).read_bytes()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            source = bpe_path if bpe_path is not None else "stanvid/assets/bpe_simple_vocab_16e6.txt.gz"
            raise ValueError(
                f"{source}: expected {_NUM_MERGES} merge lines of two symbols after the header, "
                f"got {len(merges)} lines"
            )
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder: dict[str, int] = {piece: i for i, piece in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: piece for piece, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id: int = self.encoder[START_OF_TEXT]
        self.eot_id: int = self.encoder[END_OF_TEXT]
        self.vocab_size: int = len(vocab)
        self._cache_size = cache_size
        self._word_cache: dict[str, tuple[int, ...]] = {}  # pre-token -> ids
        self._chunk_cache: dict[
            str, tuple[int, ...]
        ] = {}  # fast path: lower-cased text between spaces -> ids

    def clear_cache(self) -> None:
        """Forget every cached word (e.g. to measure cold-cache speed)."""
        self._word_cache.clear()
        self._chunk_cache.clear()

    def bpe(self, word: str) -> list[str]:
        """Merge the byte-encoded ``word`` into vocabulary pieces, lowest merge rank first.

        Same result as OpenAI's ``bpe``: each round merges every left-to-right, non-overlapping occurrence of
        the best-ranked adjacent pair, until no adjacent pair is a known merge.
        """
        symbols = [*word[:-1], word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best = None
            best_rank = len(ranks)
            for pair in pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged = []
            i, n = 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, token: str) -> tuple[int, ...]:
        """Ids of one pre-token (uncached)."""
        if token == START_OF_TEXT or token == END_OF_TEXT:
            return (self.encoder[token],)
        # Byte-to-unicode via str.translate on the UTF-8 bytes read as Latin-1 (one char per byte value).
        word = token.encode("utf-8").decode("latin-1").translate(self.byte_encoder)
        return tuple(self.encoder[piece] for piece in self.bpe(word))

    def _cached_word_ids(self, token: str) -> tuple[int, ...]:
        ids = self._word_cache.get(token)
        if ids is None:
            ids = self._word_ids(token)
            if len(self._word_cache) >= self._cache_size:
                self._word_cache.clear()
            self._word_cache[token] = ids
        return ids

    def _chunk_ids(self, chunk: str) -> tuple[int, ...]:
        ids = tuple(i for token in _ASCII_PATTERN.findall(chunk) for i in self._cached_word_ids(token))
        if len(self._chunk_cache) >= self._cache_size:
            self._chunk_cache.clear()
        self._chunk_cache[chunk] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end ids (OpenAI's ``SimpleTokenizer.encode``)."""
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, expected str")
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        if _is_fast_path_text(text):
            # No alternative of the pattern matches a space, so on cleaned ASCII text no pre-token crosses one:
            # each space-separated chunk maps to its ids on its own, and warm chunks skip the pattern entirely.
            cache = self._chunk_cache
            for chunk in text.lower().split():
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = self._chunk_ids(chunk)
                ids += chunk_ids
        else:
            for token in _PATTERN.findall(_clean_reference(text)):
                ids += self._cached_word_ids(token)
        return ids

    def encode_reference(self, text: str) -> list[int]:
        """The straightforward path: OpenAI's cleaning and pattern on every text, no fast path, no cache.

        Kept so that tests can pin :meth:`encode` (fast path, cache) to it on arbitrary text.
        """
        ids: list[int] = []
        for token in _PATTERN.findall(_clean_reference(text)):
            ids += self._word_ids(token)
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """:meth:`encode` of each text, in order."""
        encode = self._encode
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
            out.append(encode(text))
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, a 1-D tensor or a row of :func:`tokenize`).

        With ``skip_special_tokens`` everything from the last end-of-text id on (the padding of a row) is
        dropped, and so are start and end ids elsewhere, so a padded row decodes to its caption. Word ends
        become spaces as in OpenAI's ``decode``; the trailing one is stripped. Bytes that are not valid UTF-8
        (a multi-byte character cut by truncation) decode to U+FFFD.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [operator.index(i) for i in ids]
        if skip_special_tokens:
            if self.eot_id in ids:  # drop the last end-of-text and the padding after it
                ids = ids[: len(ids) - 1 - ids[::-1].index(self.eot_id)]
            ids = [i for i in ids if i != self.sot_id and i != self.eot_id]
        pieces = []
        for i in ids:
            piece = self.decoder.get(i)
            if piece is None:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            pieces.append(piece)
        # As OpenAI's decode: pieces back to bytes, UTF-8 with replacement, then word ends to spaces.
        byte_decoder = self.byte_decoder
        raw = bytes(byte_decoder[c] for c in "".join(pieces))
        text = raw.decode("utf-8", errors="replace").replace("</w>", " ")
        return text.rstrip(" ")

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = True
    ) -> torch.Tensor:
        """Start id, BPE ids, end id and zero padding per text: a LongTensor ``(N, context_length)``.

        A text with more than ``context_length - 2`` BPE ids is cut to ``context_length`` with end-of-text as
        its last id when ``truncate`` is True, and raises ``ValueError`` otherwise.
        """
        context_length = _check_context_length(context_length)
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.encode_batch(texts)
        n = len(encoded)
        body = context_length - 2  # room between the start and end ids
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=n)
        over = np.flatnonzero(lengths > body)
        if over.size and not truncate:
            i = int(over[0])
            raise ValueError(
                f"texts[{i}] has {int(lengths[i]) + 2} tokens with start and end, more than "
                f"context_length={context_length}; pass truncate=True to cut it (end-of-text is kept)"
            )
        if over.size:
            for i in over.tolist():
                encoded[i] = encoded[i][:body]
            np.minimum(lengths, body, out=lengths)
        out = np.zeros((n, context_length), dtype=np.int64)  # (N, L)
        out[:, 0] = self.sot_id
        total = int(lengths.sum())
        if total:
            flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=total)
            rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
            starts = np.cumsum(lengths) - lengths  # offset of each row's first id in `flat`
            cols = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths) + 1
            out[rows, cols] = flat
        out[np.arange(n), lengths + 1] = self.eot_id
        return torch.from_numpy(out)


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool):
        raise TypeError(f"context_length must be an integer >= 2, got {context_length!r}")
    try:
        value = operator.index(context_length)
    except TypeError:
        raise TypeError(
            f"context_length must be an integer >= 2, got {type(context_length).__name__} {context_length!r}"
        ) from None
    if value < 2:
        raise ConfigError(
            f"context_length must be >= 2 (room for the start and end-of-text ids), got {value}"
        )
    return value


@lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    """The process-wide tokenizer on the shipped vocabulary (built on first use, then shared)."""
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """CLIP token ids of ``texts``: a LongTensor ``(N, context_length)``, N = 1 for a single string.

    Each row is start id (49406), the BPE ids, end-of-text (49407), then zeros. A text longer than the row
    is cut so that its last id is still end-of-text (``truncate=True``, the default; the text tower pools at
    that position), or raises ``ValueError`` with ``truncate=False``. ``context_length`` must be >= 2.
    """
    return default_tokenizer()(texts, context_length=context_length, truncate=truncate)


def is_empty_caption(text: str) -> bool:
    """True when ``text`` has no tokens after cleaning ("", whitespace, ``&nbsp;``...).

    :func:`tokenize` gives such text the row ``[start, end, 0, ...]`` as OpenAI's tokenizer does; datasets
    use this to reject empty captions with their file and line instead of training on them.
    """
    return not default_tokenizer().encode(text)


# ---------------------------------------------------------------------------------------------- exports
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def export_tokenizer(
    context_length: int, cfg: TokenizerConfig | None = None, files: dict[str, bytes] | None = None
) -> tuple[dict, dict[str, bytes]]:
    """What a client in another language needs to reproduce this model's token ids, and the files to ship
    beside it (name -> bytes): the description `stanvid.export_onnx` writes into `stanvid_export.json`.
    `exported_tokenizer` reads it back. `cfg` and `files`: a model's own tokenizer (`TokenizerConfig`, the
    bytes of its file) where it is not CLIP's BPE (SigLIP's SentencePiece, a `tokenizer.json`)."""
    if cfg is not None and cfg.kind != "clip":
        if not files or cfg.file not in files:
            raise ConfigError(f"the model's {cfg.kind} tokenizer has no {cfg.file or 'file'} to export")
        spec = {
            "kind": cfg.kind,
            "files": {"model": cfg.file},
            "context_length": context_length,
            "config": dataclasses.asdict(cfg),
            "reader": "sentencepiece: SigLIP's SentencePiece rules; hf: a tokenizer.json through the tokenizers "
            "library after open_clip's clean mode (stanvid.models.text_tokenizers), padded to context_length",
        }
        return spec, {cfg.file: files[cfg.file]}
    spec = {
        "kind": "clip_bpe",
        "files": {"merges": CLIP_BPE_FILE},
        "context_length": context_length,
        "start_id": 49406,
        "end_id": 49407,
        "pad_id": 0,
        "cleaning": "ftfy.fix_text, html.unescape twice, whitespace collapsed to one space, lower case",
        "pattern": _PATTERN.pattern,
        "truncation": "a text longer than context_length - 2 ids is cut to them, then the end id follows",
        "merges_format": "gzip text: one header line, then 48894 merge lines 'a b' (OpenAI's CLIP vocabulary)",
    }
    return spec, {CLIP_BPE_FILE: _default_vocab_bytes()}


def exported_tokenizer(spec: dict, folder: Path) -> Callable[[Sequence[str]], torch.Tensor]:
    """The tokenizer an export describes (`export_tokenizer`; its file names relative to the export ``folder``):
    texts -> (N, context_length) ids."""
    if spec.get("kind") != "clip_bpe":
        raise ConfigError(
            f"tokenizer kind {spec.get('kind')!r} is not one this stanvid reads (clip_bpe, sentencepiece, hf)"
        )
    tok = SimpleTokenizer(folder / spec["files"]["merges"])
    context_length = int(spec["context_length"])
    return lambda texts: tok(texts, context_length=context_length)

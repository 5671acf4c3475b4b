"""CLIP BPE tokenizer: parity with OpenAI's ids, truncation, fast path against the reference path, decode."""

from __future__ import annotations

import json
import os
import random
from itertools import pairwise
from pathlib import Path

import pytest
import torch

import stanvid
from stanvid.models.tokenizer import (
    END_OF_TEXT,
    START_OF_TEXT,
    SimpleTokenizer,
    _clean_reference,
    _is_fast_path_text,
    clean_text,
    default_tokenizer,
    is_empty_caption,
    tokenize,
)

SOT, EOT = 49406, 49407


def _parity_dir() -> Path:
    override = os.environ.get("STANVID_PARITY_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def _parity_cases() -> list[dict]:
    path = _parity_dir() / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"parity vectors not found: {path} (set STANVID_PARITY_DIR to the folder that has them)")
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


def _body(row: list[int]) -> list[int]:
    """The ids between the start id and the last end-of-text id of a reference row (id 0 can be '!')."""
    end = len(row) - 1 - row[::-1].index(EOT)
    return row[1:end]


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return default_tokenizer()


def test_special_ids_and_vocab_size(tok):
    assert tok.sot_id == SOT and tok.eot_id == EOT
    assert tok.vocab_size == 49408
    assert tok.encoder[START_OF_TEXT] == SOT and tok.encoder[END_OF_TEXT] == EOT


def test_parity_rows_batch_and_single():
    cases = _parity_cases()
    texts = [c["text"] for c in cases]
    expected = torch.tensor([c["row77"] for c in cases], dtype=torch.long)
    got = stanvid.tokenize(texts)
    assert got.dtype == torch.long and got.shape == (len(cases), 77)
    mismatched = [texts[i] for i in range(len(cases)) if not torch.equal(got[i], expected[i])]
    assert not mismatched, f"rows differ from the reference for {mismatched!r}"
    for i, text in enumerate(texts):
        assert torch.equal(tokenize(text)[0], expected[i]), text


def test_parity_rows_with_a_fresh_tokenizer_and_the_reference_path():
    cases = _parity_cases()
    fresh = SimpleTokenizer(cache_size=8)  # tiny cache: cleared and refilled many times on the way
    for case in cases:
        body = _body(case["row77"])
        assert fresh.encode(case["text"])[: len(body)] == body, case["text"]
        assert fresh.encode_reference(case["text"])[: len(body)] == body, case["text"]


@pytest.mark.parametrize("context_length", [2, 3, 5, 8, 16, 32, 76, 77])
def test_truncation_keeps_end_of_text(context_length):
    """Rows at a shorter length follow from the reference 77-id rows: the prefix, then end-of-text."""
    cases = _parity_cases()
    texts = [c["text"] for c in cases]
    got = tokenize(texts, context_length=context_length)
    assert got.shape == (len(cases), context_length)
    for i, case in enumerate(cases):
        body = _body(case["row77"])[: context_length - 2]
        expected = [SOT, *body, EOT] + [0] * (context_length - 2 - len(body))
        assert got[i].tolist() == expected, (context_length, case["text"])


def test_truncation_beyond_77_and_the_no_truncate_error(tok):
    text = " ".join(f"word{i}" for i in range(120))
    ids = tok.encode(text)
    assert len(ids) > 200
    for context_length in (77, 128, 200):
        row = tokenize(text, context_length=context_length)[0].tolist()
        assert row == [SOT, *ids[: context_length - 2], EOT]
    fits = " ".join(["dog"] * 75)  # 75 BPE ids: exactly 77 with start and end
    assert tokenize(fits, truncate=False)[0].tolist() == [SOT, *tok.encode(fits), EOT]
    with pytest.raises(ValueError, match=r"texts\[1\] has 78 tokens .* context_length=77"):
        tokenize(["a dog", fits + " dog"], truncate=False)


@pytest.mark.parametrize("bad", [1, 0, -5])
def test_bad_context_length_value(bad):
    with pytest.raises(ValueError, match=r"context_length must be >= 2 \(room for the start and end-of-text"):
        tokenize("a dog", context_length=bad)


@pytest.mark.parametrize("bad", ["77", 7.5, None, True])
def test_bad_context_length_type(bad):
    with pytest.raises(TypeError, match="context_length must be an integer >= 2"):
        tokenize("a dog", context_length=bad)


def test_bad_text_type_names_the_index(tok):
    with pytest.raises(TypeError, match=r"texts\[2\] is NoneType, expected str"):
        tokenize(["a", "b", None])
    with pytest.raises(TypeError, match="text is bytes, expected str"):
        tok.encode(b"a dog")


def test_shapes_for_single_string_and_empty_batch():
    assert tokenize("a dog").shape == (1, 77)
    empty = tokenize([], context_length=16)
    assert empty.shape == (0, 16) and empty.dtype == torch.long


def test_empty_captions(tok):
    for text in ["", "   ", "\t\n", "&nbsp;", "\u3000"]:
        assert is_empty_caption(text), repr(text)
        assert tokenize(text, context_length=4)[0].tolist() == [SOT, EOT, 0, 0]
    for text in ["a", "!!!", " 寿 ", "0"]:
        assert not is_empty_caption(text), repr(text)


# --- fast path against OpenAI's path -----------------------------------------------------------------------

_PIECES = [
    "&amp;",
    "&AMP;",
    "&amp",
    "&#39;",
    "&#x2019;",
    "&quot;",
    "&lt;",
    "&gt;",
    "&nbsp;",
    "&amp;amp;",
    "&hellip;",
    "<",
    ">",
    "<br>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|ENDOFTEXT|>",
    "\x1b[31m",
    "\x1b[0m",
    "café",
    "Ελληνικά",
    "русский",
    "寿司",
    "🐱",
    "🛋️",
    "👍🏽",
    "e\u0301",
    "ﬁ",
    "ＦＵＬＬ",
    "Ⅻ",
    "½",
    "²",
    "itâ€™s",
    "Ã©",
    "â€œquoteâ€\x9d",
    "\x85",
    "\xa0",
    "\u2028",
    "\u3000",
    "\u200b",
    "\ufeff",
    "’",
    "“",
    "”",
    "'s",
    "'LL",
    "'d",
    "n't",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\x0b",
    "\x0c",
    "\x00",
    "\x7f",
]


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 12)):
        roll = rng.random()
        if roll < 0.45:
            parts.append("".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(1, 8))))
        elif roll < 0.6:
            parts.append(chr(rng.randrange(128)))
        elif roll < 0.9:
            parts.append(rng.choice(_PIECES))
        else:
            parts.append(chr(rng.randrange(0x80, 0x2FFFF)))
    return "".join(parts)


def test_fast_path_equals_reference_path_on_random_text():
    rng = random.Random(1234)
    fresh = SimpleTokenizer(cache_size=64)
    fast_hits = 0
    for _ in range(3000):
        text = _random_text(rng)
        fast_hits += _is_fast_path_text(text)
        assert clean_text(text) == _clean_reference(text), repr(text)
        assert fresh.encode(text) == fresh.encode_reference(text), repr(text)
    assert 300 < fast_hits < 2700  # both paths were exercised


def test_fast_path_equals_reference_path_on_every_ascii_pair():
    """Exhaustive over ASCII: each pair of characters, inside and at the edges of a word."""
    fresh = SimpleTokenizer()
    chars = [chr(i) for i in range(128)]
    for a in chars:
        for b in chars:
            text = f"{a}x{a}{b}Y {b}{a}"
            assert clean_text(text) == _clean_reference(text), repr(text)
            assert fresh.encode(text) == fresh.encode_reference(text), repr(text)


def _openai_style_bpe(ranks: dict[tuple[str, str], int], token: str) -> list[str]:
    """BPE written the way OpenAI's ``SimpleTokenizer.bpe`` is: min over the pair set, then merge."""
    word = (*token[:-1], token[-1] + "</w>")
    while len(word) > 1:
        bigram = min(set(pairwise(word)), key=lambda p: ranks.get(p, float("inf")))
        if bigram not in ranks:
            break
        new, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == bigram[0] and word[i + 1] == bigram[1]:
                new.append(word[i] + word[i + 1])
                i += 2
            else:
                new.append(word[i])
                i += 1
        word = tuple(new)
    return list(word)


def test_bpe_matches_an_openai_style_merge_loop(tok):
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz" * 3 + "éüñ寿司🐱'-.0123456789"
    for _ in range(2000):
        raw = "".join(rng.choice(letters) for _ in range(rng.randint(1, 14)))
        word = "".join(tok.byte_encoder[b] for b in raw.encode("utf-8"))
        assert tok.bpe(word) == _openai_style_bpe(tok.bpe_ranks, word), raw


# --- decode ---------------------------------------------------------------------------------------------------


def test_decode_round_trip_for_plain_text(tok):
    rng = random.Random(3)
    words = ["dog", "runs", "through", "the", "park", "supercalifragilistic", "café", "寿司", "ελληνικά", "x"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tokenize(text)[0]) == text
        assert tok.decode(tokenize(text)[0].numpy()) == text


def test_decode_keeps_specials_when_asked(tok):
    row = tokenize("a dog", context_length=6)[0]
    assert tok.decode(row, skip_special_tokens=False) == "<|startoftext|>a dog <|endoftext|>!!"
    assert tok.decode([SOT, *tok.encode("!!"), EOT, 0, 0]) == "!!"


def test_decode_errors(tok):
    with pytest.raises(ValueError, match="token id 49408 is outside the vocabulary"):
        tok.decode([320, 49408])
    with pytest.raises(ValueError, match=r"1-D sequence of ids, got shape \(2, 77\)"):
        tok.decode(tokenize(["a", "b"]))


def test_bad_vocabulary_file(tmp_path):
    import gzip

    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(ValueError, match=r"vocab.txt.gz: expected 48894 merge lines"):
        SimpleTokenizer(bpe_path=path)

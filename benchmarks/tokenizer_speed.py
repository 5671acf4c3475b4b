"""Captions per second of ``stanvid.tokenize`` against an OpenAI-style tokenizer, same run, one thread.

The OpenAI-style tokenizer is written below the way OpenAI's ``clip/simple_tokenizer.py`` works (ftfy and
HTML unescaping on every caption, the ``regex`` pattern, BPE with its per-word string cache, a per-row tensor
fill); on the same machine it reaches about the throughput of the official tokenizer, so the ratio printed
at the end is the speed-up that users get. Cold = a fresh tokenizer whose word cache is empty, warm = a
second pass over the same captions. Both tokenizers must produce identical ids, checked here too.

    python benchmarks/tokenizer_speed.py [--captions 20000] [--seed 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gzip
import html
import random
import time
from importlib import resources
from itertools import pairwise

import ftfy
import regex
import torch

import stanvid
from stanvid import SimpleTokenizer, default_tokenizer

SUBJECTS = [
    "a man",
    "a woman",
    "a boy",
    "a girl",
    "two dogs",
    "a cat",
    "people",
    "a chef",
    "the crowd",
    "a band",
    "a cartoon character",
    "someone",
    "a player",
    "the host",
    "kids",
    "a reporter",
    "a baby",
    "an old man",
    "a couple",
    "the team",
    "a teacher",
    "a news anchor",
    "a group of friends",
    "a person",
    "the driver",
]
VERBS = [
    "is playing",
    "is talking about",
    "is cooking",
    "plays",
    "shows",
    "is driving",
    "dances with",
    "explains",
    "is singing",
    "walks past",
    "is riding",
    "reviews",
    "is describing",
    "throws",
    "is holding",
    "watches",
    "is cutting",
    "is demonstrating",
    "jumps over",
    "is painting",
    "fixes",
    "is swimming near",
    "opens",
]
OBJECTS = [
    "a guitar",
    "the kitchen",
    "a red car",
    "a soccer ball",
    "the stage",
    "a video game",
    "tomatoes",
    "a new phone",
    "the beach",
    "a large cake",
    "the camera",
    "a laptop",
    "some pasta",
    "a horse",
    "the news",
    "a mountain road",
    "a birthday party",
    "a wooden table",
    "a pile of leaves",
    "the audience",
    "a puppy",
]
TAILS = [
    "",
    "",
    "",
    " in the park",
    " on a sunny day",
    " while people watch",
    " for the audience",
    " at night",
    " in slow motion",
    " and laughs",
    ", then smiles at the camera",
    " in 2019",
    " with 3 friends",
    " before the match starts",
    " during the 2nd half",
    " in a small room with bright lights",
]
ODD = [
    "café",
    "crème brûlée",
    "naïve",
    "piñata",
    "寿司",
    "🐱",
    "🎸",
    "Tom &amp; Jerry",
    "&quot;hello&quot;",
    "it’s",
    "Ελληνικά",
    "русский",
    "ﬁne",
    "ＦＵＬＬ",
    "he's",
    "don't",
    "50%",
    "#1",
    "5.5 km/h",
    "it's",
]


SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ter",
    "bran",
    "zu",
    "vel",
    "qui",
    "dor",
    "shen",
    "ax",
    "po",
    "rim",
    "tal",
    "ny",
]


def make_captions(n: int, seed: int) -> list[str]:
    """MSR-VTT-like captions: short templates, some long ones, some capitals, about 10% non-ASCII or HTML.

    A third of them name something (a made-up word of 2-4 syllables: people, places, brands), so that the
    set has thousands of distinct words, as a real caption set does, and a cold word cache is really cold.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
        if rng.random() < 0.33:
            name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
            text += f" {rng.choice(['at', 'with', 'from', 'about'])} {name.capitalize()}"
        roll = rng.random()
        if roll < 0.10:
            words = text.split()
            words.insert(rng.randrange(len(words) + 1), rng.choice(ODD))
            text = " ".join(words)
        elif roll < 0.15:  # long descriptions, some beyond 77 tokens
            parts = [text] + [
                f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                for _ in range(rng.randint(3, 12))
            ]
            text = " and ".join(parts)
        if rng.random() < 0.2:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.3:
            text += "."
        out.append(text)
    return out


class OpenAIStyleTokenizer:
    """OpenAI's ``SimpleTokenizer`` and ``tokenize`` as released, for a same-run speed comparison."""

    def __init__(self) -> None:
        bs = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1))
        )
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, [chr(c) for c in cs], strict=True))
        data = (resources.files("stanvid") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
        merges = gzip.decompress(data).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(pairwise(word))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(pairwise(word))
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def tokenize(self, texts: list[str], context_length: int = 77) -> torch.Tensor:
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        all_tokens = [[sot] + self.encode(text) + [eot] for text in texts]
        result = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
        for i, tokens in enumerate(all_tokens):
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = eot
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="cold and warm runs each; the best is printed")
    args = parser.parse_args()
    torch.set_num_threads(1)

    captions = make_captions(args.captions, args.seed)
    n = len(captions)
    ascii_share = sum(c.isascii() and "&" not in c for c in captions) / n
    distinct = len({w for c in captions for w in c.lower().split()})
    print(
        f"{n} captions (seed {args.seed}), {ascii_share:.0%} plain ASCII, {distinct} distinct words, "
        f"{sum(len(c) for c in captions) / n:.0f} characters on average, torch threads: {torch.get_num_threads()}"
    )

    init_s = timed(SimpleTokenizer)[1]
    print(f"building a SimpleTokenizer (vocabulary, merges): {init_s * 1e3:.0f} ms, not counted below")

    def stanvid_fresh() -> None:
        default_tokenizer().clear_cache()  # stanvid.tokenize's shared tokenizer, word cache emptied

    results = {}
    for name, factory, call in [
        ("stanvid.tokenize", stanvid_fresh, lambda _, texts: stanvid.tokenize(texts)),
        ("OpenAI-style", OpenAIStyleTokenizer, lambda tok, texts: tok.tokenize(texts)),
    ]:
        cold, warm = [], []
        for _ in range(args.repeats):
            tok = factory()
            out, cold_s = timed(call, tok, captions)
            _, warm_s = timed(call, tok, captions)
            cold.append(cold_s)
            warm.append(warm_s)
        results[name] = out
        results[name + " times"] = (min(cold), min(warm))
        print(f"{name:>17}: cold {n / min(cold):>9,.0f} captions/s   warm {n / min(warm):>9,.0f} captions/s")

    if not torch.equal(results["stanvid.tokenize"], results["OpenAI-style"]):
        raise SystemExit("ids differ between stanvid and the OpenAI-style tokenizer")
    s_cold, s_warm = results["stanvid.tokenize times"]
    o_cold, o_warm = results["OpenAI-style times"]
    print(
        f"speed-up over OpenAI-style, same run: cold x{o_cold / s_cold:.2f}, warm x{o_warm / s_warm:.2f} "
        f"(ids identical on all {n} captions)"
    )


if __name__ == "__main__":
    main()

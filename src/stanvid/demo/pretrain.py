"""Image-text pretraining of a small CLIP, the role OpenAI's pretraining plays before a video transfer.

The images are single frames decoded (`stanvid.read_frames`) from the corpus's pretraining clips, and every
caption describes one frame: the object ("a red circle"), and sometimes where it is and how big
("a small red circle", "a red circle on the left"), or "nothing" for an empty frame. The CLIP that comes out
knows objects, colours, sizes and positions, the words of single frames, but has never seen a caption about
motion or order, as OpenAI's CLIP had never seen video.

Why the size and position words: a text encoder that only ever saw 24 object names learns to ignore every
other word, so at the start of the video transfer "a red circle moves to the left" and "... to the right"
embed almost identically (cosine 0.998 in the first version of this demo), the video side gets no signal
to tell a clip from its reversal, and neither side moves: a symmetric saddle that a tiny model left only
by chance within the budget. OpenAI's text encoder knows "left" from "right" from language; these captions
give the demo's CLIP the same start.

Batches alternate between two kinds, each free of false negatives:

* plain: one frame of each of `batch_size` different objects (plus an empty frame), object captions;
* contrast: two frames of each of `batch_size // 2` objects that differ in size or in position, captioned
  with the word that tells them apart ("a small red circle" / "a big red circle").

The loop itself is a plain image-text one (`stanvid.training.loop.fit` trains video models): the symmetric InfoNCE
of `stanvid.training.losses.contrastive_loss` with CLIP's learned temperature, AdamW, warmup then cosine decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from stanvid.demo.synth import NOTHING, Corpus
from stanvid.errors import DatasetError
from stanvid.models.tokenizer import tokenize
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.losses import contrastive_loss
from stanvid.video.transforms import normalize

__all__ = [
    "PretrainConfig",
    "FrameSet",
    "load_frames",
    "describe",
    "pretrain_clip",
    "SIZE_WORDS",
    "POSITION_WORDS",
]

# radius (fraction of the frame width) below / above which a frame's object is called small / big
SIZE_WORDS = ((0.165, "small"), (0.215, "big"))
# centre (fraction of the width) left of / right of which the object is "on the left" / "on the right"
POSITION_WORDS = ((0.4, "on the left"), (0.6, "on the right"))


@dataclass
class PretrainConfig:
    steps: int = 1200
    batch_size: int = 24  # objects per plain batch (at most the number of objects); contrast: half, twice
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    max_logit_scale: float = 100.0  # CLIP clamps its learned scale at 100
    seed: int = 0


@dataclass
class FrameSet:
    """Decoded frames with what each shows."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    objects: list[str]  # the object caption of every frame ("a red circle"), NOTHING for an empty frame
    size: np.ndarray  # (N,) size word index: 0 small, 1 neither, 2 big
    position: np.ndarray  # (N,) 0 left, 1 middle, 2 right

    @property
    def captions(self) -> list[str]:
        """The distinct object captions (the appearance vocabulary)."""
        return sorted(set(self.objects))


def _bin(value: float, cuts: tuple[tuple[float, str], tuple[float, str]]) -> int:
    return 0 if value < cuts[0][0] else (2 if value > cuts[1][0] else 1)


def load_frames(corpus: Corpus, split: str = "pretrain") -> FrameSet:
    """Every frame of the appearance clips of `split`, decoded from their files, with what it shows.

    Size and position come from the clip's recorded track (pretraining clips); clips without one (the test
    split) get the middle bins, so only their object is described.
    """
    from stanvid.video.decode import probe, read_frames

    clips = corpus.select(split, "appearance")
    if not clips:
        raise DatasetError(f"{corpus.jsonl}: no appearance clips in split {split!r}")
    images, objects, sizes, positions = [], [], [], []
    for clip in clips:
        source = corpus.source(clip.video)  # held frames after `Corpus.hold`, else the file
        frames = read_frames(source, np.arange(probe(source).num_frames))  # (F, S, S, 3)
        images.append(frames.permute(0, 3, 1, 2))  # (F, 3, S, S)
        n = frames.shape[0]
        objects += [clip.caption] * n
        if clip.track is not None and clip.caption != NOTHING:
            sizes += [_bin(r, SIZE_WORDS) for r in clip.track["r"]]
            positions += [_bin(x, POSITION_WORDS) for x in clip.track["x"]]
        else:
            sizes += [1] * n
            positions += [1] * n
    return FrameSet(torch.cat(images), objects, np.array(sizes), np.array(positions))


def describe(obj: str, size: int = 1, position: int = 1) -> str:
    """A frame's caption: ``describe("a red circle", size=0)`` -> "a small red circle"."""
    if obj == NOTHING:
        return obj
    if size != 1:
        obj = f"a {SIZE_WORDS[size // 2][1]} {obj[2:]}"
    if position != 1:
        obj = f"{obj} {POSITION_WORDS[position // 2][1]}"
    return obj


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _Batches:
    """Draws the plain and contrast batches (see the module docstring)."""

    def __init__(self, frames: FrameSet, batch_size: int, seed: int) -> None:
        self.frames = frames
        self.rng = np.random.default_rng([seed, 4])
        names = frames.captions
        self.things = [n for n in names if n != NOTHING]
        self.empty = [i for i, o in enumerate(frames.objects) if o == NOTHING]
        by_object = {n: np.array([i for i, o in enumerate(frames.objects) if o == n]) for n in self.things}
        self.by_object = by_object
        self.plain_size = min(batch_size, len(self.things))
        self.pair_size = max(1, min(batch_size // 2, len(self.things)))

    def _pick(self, pool: np.ndarray) -> int:
        return int(pool[self.rng.integers(len(pool))])

    def plain(self) -> tuple[list[int], list[str]]:
        chosen = self.rng.choice(len(self.things), size=self.plain_size, replace=False)
        picks = [self._pick(self.by_object[self.things[k]]) for k in chosen]
        captions = [self.things[k] for k in chosen]
        return self._with_empty(picks, captions)

    def contrast(self) -> tuple[list[int], list[str]]:
        picks, captions = [], []
        f = self.frames
        for k in self.rng.permutation(len(self.things)):
            if len(picks) >= 2 * self.pair_size:
                break
            obj = self.things[k]
            pool = self.by_object[obj]
            attribute = self.rng.integers(2)  # 0: size, 1: position
            bins = f.size[pool] if attribute == 0 else f.position[pool]
            low, high = pool[bins == 0], pool[bins == 2]
            if len(low) == 0 or len(high) == 0:
                continue
            for side, group in ((0, low), (2, high)):
                picks.append(self._pick(group))
                captions.append(describe(obj, size=side) if attribute == 0 else describe(obj, position=side))
        return self._with_empty(picks, captions)

    def _with_empty(self, picks: list[int], captions: list[str]) -> tuple[list[int], list[str]]:
        if self.empty:
            picks.append(self._pick(np.array(self.empty)))
            captions.append(NOTHING)
        return picks, captions


def pretrain_clip(
    model: VideoCLIP, frames: FrameSet, config: PretrainConfig | None = None, progress: bool = True
) -> list[float]:
    """Train `model`'s image and text towers in place on `frames`; returns the loss of every step."""
    config = config or PretrainConfig()
    torch.manual_seed(config.seed)
    context = model.config.clip.text.context_length
    batches = _Batches(frames, config.batch_size, config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(
        range(config.steps), desc="pretrain: image-text CLIP", unit="step", disable=not progress, leave=False
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        picks, captions = batches.contrast() if step % 2 else batches.plain()
        images = normalize(frames.images[picks])  # (B, 3, S, S) float, CLIP mean/std
        image_emb = model.encode_image(images)  # (B, D)
        text_emb = model.encode_text(tokenize(captions, context_length=context))  # (B, D)
        scale = model.logit_scale.exp().clamp(max=config.max_logit_scale)
        loss = contrastive_loss(image_emb, text_emb, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses

"""Image-to-video transfer of the pretrained CLIP with one temporal module, through `stanvid.training.loop.fit`.

The training items come from the library's retrieval dataset (`stanvid.data.RetrievalDataset` over the
corpus's ``train.csv``: real files decoded with `stanvid.read_frames`, once, into memory (`Corpus.hold`), uniform
frame sampling, a crop shared by the clip's frames). `ReversalPairs` only decides which clips share a batch: each item is a clip **and its
reversal** (for appearance clips, two clips of different objects), so every order caption meets, in its own
batch, the one negative that differs from it only in frame order. Drawn at random, a batch of 32 from this
corpus rarely holds a clip's reversal, and a tiny model on a CPU budget learns frame order several times
slower (measured while building the demo: STAN reached 65% pair accuracy after 600 random batches, 100% after
300 paired ones). Every model gets the same batches; a model blind to order gains nothing from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from stanvid.data import RetrievalDataset, collate_skipping
from stanvid.demo.synth import Corpus
from stanvid.errors import DatasetError
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.recipe import DataRecipe, ModelRecipe, OptimRecipe, Recipe, TrainRecipe
from stanvid.video.transforms import TrainTransform

__all__ = ["TransferConfig", "ReversalPairs", "collate_pairs", "training_set", "transfer_recipe", "transfer"]


@dataclass
class TransferConfig:
    """The budget every temporal module gets (identical across models)."""

    steps: int = 300
    pairs_per_batch: int = 16  # a batch holds 2x this many clips
    lr: float = 3e-4  # CLIP's parameters; the temporal module's get 10x (the official lr_mult)
    new_param_lr_mult: float = 10.0
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    temperature: float = 0.05  # fixed tau, as the official recipes fix theirs
    crop_area: tuple[float, float] = (0.8, 1.0)  # random resized crop, one box per clip, no flip
    num_workers: int = 0  # decoding worker processes; none when the corpus is held in memory (`Corpus.hold`)
    seed: int = 0
    precision: str = "fp32"  # train.precision of every transfer run (`DemoConfig.create` picks it)


class ReversalPairs(Dataset):
    """Items of a `RetrievalDataset` served two at a time: ``[item a, item b]`` per index.

    `groups` lists the caption-index pairs; `collate_pairs` flattens a batch of pairs into one batch of clips.
    """

    def __init__(self, dataset: RetrievalDataset, groups: Sequence[tuple[int, int]]) -> None:
        if not groups:
            raise DatasetError("ReversalPairs needs at least one pair")
        self.dataset = dataset
        self.groups = [tuple(int(i) for i in g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[Any]:
        return [self.dataset[i] for i in self.groups[index]]


def collate_pairs(batch: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A batch of pairs -> one batch of ``2 x len(batch)`` clips (`stanvid.data.collate_skipping` does the rest)."""
    return collate_skipping([item for pair in batch for item in pair])


def training_set(corpus: Corpus, config: TransferConfig, context_length: int) -> ReversalPairs:
    """The training split as pairs: each order clip with its reversal, appearance clips two by two."""
    annotations = corpus.annotations(corpus.train_csv)
    dataset = RetrievalDataset(
        annotations,
        num_frames=corpus.config.num_frames,
        train=True,
        unit="caption",
        transform=TrainTransform(size=corpus.config.image_size, scale=config.crop_area, flip=False),
        context_length=context_length,
        seed=config.seed,
    )
    caption_of = {}
    for caption_index, video_index in enumerate(annotations.text_to_video.tolist()):
        caption_of[annotations.video_ids[video_index]] = caption_index
    clips = corpus.select("train")
    missing = [c.video for c in clips if c.video not in caption_of]
    if missing:
        raise DatasetError(
            f"{corpus.train_csv}: no caption row for {len(missing)} clip(s), e.g. {missing[0]}"
        )
    groups: list[tuple[int, int]] = []
    for clip in clips:
        if clip.kind == "order" and not clip.reversed:
            assert clip.partner is not None
            groups.append((caption_of[clip.video], caption_of[clip.partner]))
    rng = np.random.default_rng([config.seed, 3])
    appearance = [c for c in clips if c.kind == "appearance"]
    order = rng.permutation(len(appearance))
    # pair clip k of a shuffled list with clip k + half: different objects unless an object fills half the list
    half = len(order) // 2
    for a, b in zip(order[:half], order[half : 2 * half], strict=True):
        groups.append((caption_of[appearance[a].video], caption_of[appearance[b].video]))
    return ReversalPairs(dataset, groups)


def transfer_recipe(
    corpus: Corpus,
    config: TransferConfig,
    clip_dir: Path,
    temporal: dict[str, Any],
    *,
    items: int,
    stan_depth: int,
    context_length: int,
) -> Recipe:
    """The `Recipe` of one transfer run: `config.steps` optimizer steps whatever the training-set size,
    warmup then a cosine decay that ends exactly at the last step."""
    steps_per_epoch = items // config.pairs_per_batch
    if steps_per_epoch == 0:
        raise DatasetError(f"{items} training pairs are fewer than a batch of {config.pairs_per_batch}")
    epochs = math.ceil(config.steps / steps_per_epoch)
    run_epochs = config.steps / steps_per_epoch
    warmup = run_epochs * config.warmup_fraction
    size = corpus.config.image_size
    return Recipe(  # validated on construction, as a recipe file would be
        task="retrieval",
        name=f"demo-{temporal['temporal']}-{temporal.get('time_module', '')}".rstrip("-"),
        model=ModelRecipe(
            source=str(clip_dir),
            temporal=temporal["temporal"],
            stan_depth=stan_depth,
            time_module=temporal.get("time_module", "selfattn"),
            num_frames=corpus.config.num_frames,
            similarity=temporal.get("similarity", "cosine"),
        ),
        data=DataRecipe(
            dataset="captions",
            root=str(corpus.root),
            train_annotations=corpus.train_csv.name,
            test_annotations=corpus.test_order_csv.name,
            video_dir=corpus.video_dir.name,
            num_frames=corpus.config.num_frames,
            input_size=size,
            train_resize=size,
            test_resize=size,
            random_crop_area=config.crop_area,
            text_length=context_length,
            flip=False,
            num_workers=config.num_workers,
        ),
        optim=OptimRecipe(
            lr=config.lr,
            new_param_lr_mult=config.new_param_lr_mult,
            weight_decay=config.weight_decay,
            schedule="cosine",
            warmup_epochs=warmup,
            cosine_epochs=run_epochs - warmup,
        ),
        train=TrainRecipe(
            epochs=epochs,
            batch_size=config.pairs_per_batch,
            temperature=config.temperature,
            checkpoint_every=0,
            max_steps=config.steps,
            seed=config.seed,
            log_every=10,
            precision=config.precision,
        ),
    )


def transfer(model: VideoCLIP, train_set: ReversalPairs, recipe: Recipe, progress: bool = True):
    """Train `model` in place with the library's training loop; returns its `stanvid.training.loop.TrainResult`."""
    from stanvid.training.loop import fit

    return fit(model, train_set, recipe, out_dir=None, progress=progress, collate_fn=collate_pairs)

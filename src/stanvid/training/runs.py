"""Runs from a recipe: the model, the datasets, train-then-evaluate, evaluation of a checkpoint, dry-run checks.

This is what ``stanvid train`` and ``stanvid eval`` call, one function each:

    recipe = stanvid.load_recipe("configs/stan_msrvtt_b32.yaml", ["data.root=/datasets/msrvtt"])
    print(check_run(recipe))                    # --dry-run: annotations, videos, model source, step counts
    result = train_run(recipe, resume=True)     # fit() + evaluation every train.eval_every epochs
    report = evaluate_run(recipe, "runs/stan_msrvtt_b32/model", baseline=True)

How the ``data`` section maps to annotation readers (paths relative to ``data.root``): the table of
`stanvid.data.datasets` (one entry per ``data.dataset`` name, with the files it reads).

Training items are one per caption (retrieval; the official STAN training set) or per video (recognition);
test items are one per video, the captions being the queries. Every problem (a missing file, a video id with
no file, a model that does not fit the data settings) raises a `StanvidError` naming it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from stanvid.checkpoints.load import load_model
from stanvid.data.datasets import SplitFiles, read_split
from stanvid.data.recognition import RecognitionAnnotations, RecognitionDataset
from stanvid.data.retrieval import RetrievalAnnotations, RetrievalDataset
from stanvid.data.shard_dataset import ShardDataset
from stanvid.distributed import default_device, launch_world_size, leave_process_group, rank_world
from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.config import ModelConfig, PreprocessConfig
from stanvid.models.heads import LinearHead
from stanvid.models.video_clip import VideoCLIP
from stanvid.precision import resolve_precision
from stanvid.training.checkpoint import (
    first_line,
    is_torch_save_zip,
    is_training_checkpoint,
    latest_checkpoint,
    read_checkpoint_file,
)
from stanvid.training.evaluate import evaluate_recognition, evaluate_retrieval, write_results, zero_shot_model
from stanvid.training.loop import (
    HEAD_FILE,
    TrainResult,
    fit,
    optimizer_steps_per_epoch,
    refuse_checkpoints_unless_resuming,
)
from stanvid.training.metrics import format_table
from stanvid.training.recipe import LEARNABLE, Recipe
from stanvid.training.shard_runs import check_shards, shard_split_files, shard_train_set
from stanvid.training.trainer import effective_precision, precision_note, setup_distributed
from stanvid.video.transforms import EvalTransform, MultiCropTransform, TrainTransform

__all__ = [
    "load_split",
    "build_dataset",
    "load_run_model",
    "load_trained",
    "check_run",
    "train_run",
    "evaluate_run",
    "evaluate_model",
]

SPLITS = ("train", "test")


# ---- data ----------------------------------------------------------------------------------------------------


def load_split(recipe: Recipe, split: str) -> RetrievalAnnotations | RecognitionAnnotations:
    """The annotations of ``split`` (``train`` or ``test``), every video resolved to a file."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    d = recipe.data
    if d.dataset == "webdataset":  # local shards, map-style (streamed for training: `build_dataset`)
        return read_split(shard_split_files(recipe, split))
    name = d.train_annotations if split == "train" else d.test_annotations
    if not name:
        raise ConfigError(f"data.{split}_annotations is not set (the {split} split's annotation file)")
    folder = d.video_dir if split == "train" or d.test_video_dir is None else d.test_video_dir
    files = SplitFiles(
        dataset=d.dataset,
        split=split,
        task=recipe.task,
        annotations=d.path(name),
        videos=d.path(folder),
        captions=d.path(d.captions) if d.captions else None,
        class_names=d.path(d.class_names) if d.class_names else None,
    )
    return read_split(files)


def _train_transform(recipe: Recipe, flip: bool, norm: dict[str, Any]) -> TrainTransform:
    """The official STAN training pipeline with the recipe's values (short side, crop area/ratio, flip)."""
    d = recipe.data
    return TrainTransform(
        **norm,
        size=d.input_size,
        scale=d.random_crop_area,
        ratio=d.random_crop_ratio,
        flip=flip,
        short_side=d.train_resize,
        interpolation="bilinear",
        antialias=False,
        round_long_side=True,
    )


def build_dataset(
    recipe: Recipe,
    split: str,
    annotations: RetrievalAnnotations | RecognitionAnnotations | None = None,
    *,
    preprocess: PreprocessConfig | None = None,
    tokenizer: Callable[..., torch.Tensor] | None = None,
) -> RetrievalDataset | RecognitionDataset | ShardDataset:
    """The dataset of ``split``: training (random frames and crops) or test (fixed frames, centre / test views).
    ``webdataset`` training streams its shards (`stanvid.data.ShardDataset`); its test split reads them by
    member offset.

    ``preprocess``: the normalization of the model the frames are for (``model.config.clip.preprocess``: an
    open_clip release may have been trained with other values than OpenAI's); OpenAI's CLIP values without it.
    ``tokenizer``: the model's (``model.text_tokenizer()``); CLIP's BPE without it.
    """
    d, e = recipe.data, recipe.eval
    pre = preprocess if preprocess is not None else PreprocessConfig()
    norm = {"mean": tuple(pre.mean), "std": tuple(pre.std)}
    train = split == "train"
    if recipe.task == "retrieval" and d.sampler != "uniform":
        raise ConfigError(
            f"data.sampler {d.sampler!r}: retrieval samples frames uniformly (data.sampler: uniform)"
        )
    if d.dataset == "webdataset" and train and annotations is None:  # streamed from the shards
        return shard_train_set(recipe, _train_transform(recipe, d.flip, norm), tokenizer)
    ann = annotations if annotations is not None else load_split(recipe, split)
    if recipe.task == "retrieval":
        if train:
            transform = _train_transform(recipe, d.flip, norm)
        else:
            fit = {"resize_mode": pre.resize_mode, "interpolation": pre.interpolation}
            transform = EvalTransform(d.input_size, short_side=d.test_resize, **fit, **norm)
        return RetrievalDataset(
            ann,
            num_frames=d.num_frames if train or d.test_num_frames is None else d.test_num_frames,
            train=train,
            unit="caption" if train else "video",
            transform=transform,
            image_size=d.input_size,
            context_length=d.text_length,
            seed=recipe.train.seed,
            tokenizer=tokenizer,
        )
    if train and d.flip and not ann.flip_safe:
        raise ConfigError(
            f"data.flip: {d.dataset} labels change meaning when mirrored (left/right); set data.flip=false"
        )
    if train:
        transform = _train_transform(recipe, d.flip, norm)
    else:
        transform = MultiCropTransform(d.input_size, num_crops=e.num_crops, short_side=d.test_resize, **norm)
    return RecognitionDataset(
        ann,
        num_frames=d.num_frames,
        train=train,
        sampling=d.sampler,
        frame_interval=d.frame_interval,
        num_clips=1 if train else e.num_clips,
        num_crops=1 if train else e.num_crops,
        transform=transform,
        image_size=d.input_size,
        flip=d.flip if train else False,
        seed=recipe.train.seed,
    )


# ---- models --------------------------------------------------------------------------------------------------


def load_run_model(recipe: Recipe) -> nn.Module:
    """``model.source`` with the recipe's temporal module (a plain CLIP gets STAN's initialisation)."""
    m = recipe.model
    model = load_model(
        m.source,
        temporal=m.temporal,
        stan_depth=m.stan_depth,
        time_module=m.time_module,
        num_frames=m.num_frames,
        **mug_overrides(recipe),
    )
    model.set_grad_checkpointing(m.grad_checkpointing)
    check_model_fits(model, recipe, m.source)
    return model


def mug_overrides(recipe: Recipe) -> dict[str, Any]:
    """The recipe's Mug head as `load_model` overrides; empty for ``similarity: cosine``, so a model keeps the
    head its checkpoint records (a Mug-STAN model evaluated with a STAN recipe is still scored by its head)."""
    m = recipe.model
    if m.similarity == "cosine":
        return {}
    return {"similarity": m.similarity, "mug_mode": m.mug_mode, "mug_tau": m.mug_tau}


def check_model_fits(model: nn.Module, recipe: Recipe, source: Any) -> None:
    """The data settings the model's fixed sizes constrain: input size and caption length."""
    clip = model.config.clip
    if recipe.data.input_size != clip.vision.image_size:
        raise ConfigError(
            f"data.input_size {recipe.data.input_size} does not match the model's image size "
            f"{clip.vision.image_size} ({source})"
        )
    if recipe.data.text_length > clip.text.context_length:
        raise ConfigError(
            f"data.text_length {recipe.data.text_length} exceeds the model's text context "
            f"{clip.text.context_length} ({source})"
        )


def load_trained(checkpoint: str | os.PathLike, recipe: Recipe) -> tuple[nn.Module, nn.Module | None]:
    """A model to evaluate, and its linear head if it has one.

    ``checkpoint`` is a training checkpoint (``checkpoints/step-*.pt``), a model folder written by training
    (``model/``, with ``head.safetensors`` for a linear head) or any other `stanvid.load_model` source; the
    temporal module is the checkpoint's own (a plain CLIP is evaluated with mean pooling).
    """

    path = Path(checkpoint)
    head_state = None
    if is_torch_save_zip(path):
        # unsafe (a pickle calling code: refused, nothing runs), truncated or foreign: a one-line CheckpointError
        state = read_checkpoint_file(path)
        if is_training_checkpoint(state):
            try:
                config = ModelConfig.from_dict(state["model_config"]).replace(
                    num_frames=recipe.model.num_frames, **mug_overrides(recipe)
                )
                model = VideoCLIP(config)
                model.load_state_dict(state["model"])
                if model.tokenizer is None:  # weights only: the tokenizer's file is the recipe's source's
                    model.set_tokenizer(load_run_model(recipe).tokenizer)
                head_state = state["trainer"].get("head")
            except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: a damaged training checkpoint ({first_line(exc)})") from exc
            model.eval()
        else:
            model = load_model(path, num_frames=recipe.model.num_frames, **mug_overrides(recipe))
    else:
        model = load_model(path, num_frames=recipe.model.num_frames, **mug_overrides(recipe))
        if path.is_dir() and (path / HEAD_FILE).is_file():
            head_state = load_file(str(path / HEAD_FILE))
    head = None
    if head_state is not None:
        weight = head_state.get("fc.weight")
        if weight is None:
            raise CheckpointError(f"{path}: the linear head has no fc.weight")
        head = LinearHead(weight.shape[1], weight.shape[0])
        head.load_state_dict(head_state)
        head.eval()
    check_model_fits(model, recipe, path)
    return model, head


# ---- evaluation ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _process_group(recipe: Recipe) -> Iterator[None]:
    """The torchrun process group for a run: initialised here if needed (with the recipe's
    ``train.dist_timeout_minutes``), and destroyed at the end if it was."""
    existed = dist.is_available() and dist.is_initialized()
    setup_distributed(recipe.train.dist_timeout_minutes)
    clean = False
    try:
        yield
        clean = True
    finally:
        if not existed:
            leave_process_group(clean)


def evaluation_precision(train_precision: str, device: torch.device) -> str:
    """The precision evaluation runs in by default: the training precision on ``device``
    (`effective_precision`), except fp16 on the CPU, which is float32 there: the loss scaler is a training
    matter, and CPU fp16 without native support is only slower."""
    precision = effective_precision(train_precision, torch.device(device))
    return "fp32" if torch.device(device).type == "cpu" and precision == "fp16" else precision


def evaluate_model(
    model: nn.Module,
    dataset: RetrievalDataset | RecognitionDataset,
    recipe: Recipe,
    *,
    head: nn.Module | None = None,
    logit_scale: float | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """`evaluate_retrieval` / `evaluate_recognition` with the recipe's evaluation settings.

    ``precision`` (`stanvid.precision.PRECISIONS`) defaults to the training precision, as the evaluation during
    training runs (`evaluation_precision`: ``train.precision`` where it trains, fp16 evaluated in fp32 on a CPU).
    """
    e = recipe.eval
    if precision is None:
        where = torch.device(device) if device is not None else next(model.parameters()).device
        precision = evaluation_precision(recipe.train.precision, where)
    common = {
        "batch_size": e.batch_size,
        "num_workers": recipe.data.num_workers,
        "device": device,
        "precision": precision,
        "progress": progress,
    }
    if recipe.task == "retrieval":
        return evaluate_retrieval(
            model, dataset, dsl=e.dsl, dsl_temperature=e.dsl_temperature, chunk_size=e.chunk_size, **common
        )
    return evaluate_recognition(
        model,
        dataset,
        head=head,
        logit_scale=logit_scale,
        text_length=recipe.data.text_length,
        view_average=e.view_average,
        **common,
    )


def _recipe_scale(recipe: Recipe, model: nn.Module) -> float:
    """The logit scale recognition was trained with: ``1 / tau``, or the model's learned one."""
    if recipe.train.temperature == LEARNABLE:
        return float(model.logit_scale.detach().exp())
    return 1.0 / float(recipe.train.temperature)


def evaluate_run(
    recipe: Recipe,
    checkpoint: str | os.PathLike | None = None,
    *,
    baseline: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default ``model.source``) on the recipe's test split, and with ``baseline`` the
    zero-shot plain CLIP of ``model.source`` too; writes ``eval.json`` and ``eval.txt`` to ``out_dir`` (default
    ``train.output_dir``) on rank 0 and returns the report (``report["table"]`` is the readable table).
    ``precision``: see `evaluate_model` (the report records the one used)."""
    with _process_group(recipe):
        return _evaluate_run(recipe, checkpoint, baseline, out_dir, progress, precision)


def _evaluate_run(
    recipe: Recipe,
    checkpoint: str | os.PathLike | None,
    baseline: bool,
    out_dir: Any,
    progress: bool,
    precision: str | None = None,
) -> dict[str, Any]:
    rank, _ = rank_world()
    device = default_device()
    annotations = load_split(recipe, "test")
    rows: dict[str, Any] = {}
    source = checkpoint if checkpoint is not None else recipe.model.source
    if checkpoint is not None or not baseline:
        model, head = load_trained(source, recipe)
        model.to(device)
        if head is not None:
            head.to(device)
        scale = _recipe_scale(recipe, model)
        label = Path(source).name if Path(source).exists() else str(source)
        head_name = f" + Mug head ({model.config.mug_mode})" if model.config.similarity == "mug" else ""
        dataset = build_dataset(
            recipe,
            "test",
            annotations,
            preprocess=model.config.clip.preprocess,
            tokenizer=model.text_tokenizer(),
        )
        rows[f"{model.config.temporal}{head_name} ({label})"] = evaluate_model(
            model,
            dataset,
            recipe,
            head=head,
            logit_scale=scale,
            progress=progress,
            device=device,
            precision=precision,
        )
        del model
    if baseline:
        plain = zero_shot_model(recipe.model.source, recipe.model.num_frames).to(device)
        check_model_fits(plain, recipe, recipe.model.source)
        dataset = build_dataset(
            recipe,
            "test",
            annotations,
            preprocess=plain.config.clip.preprocess,
            tokenizer=plain.text_tokenizer(),
        )
        rows["zero-shot CLIP (meanP)"] = evaluate_model(
            plain, dataset, recipe, progress=progress, device=device, precision=precision
        )
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "task": recipe.task,
        "checkpoint": str(source),
        "precision": resolve_precision(precision, device)
        if precision is not None
        else evaluation_precision(recipe.train.precision, device),
        "test_annotations": str(recipe.data.path(recipe.data.test_annotations)),
        "num_videos": len(annotations.video_ids),
        "metrics": rows,
    }
    if isinstance(annotations, RetrievalAnnotations):
        report["num_texts"] = annotations.num_captions
    if rank == 0:
        folder = Path(out_dir) if out_dir is not None else Path(recipe.train.output_dir)
        json_path, table = write_results(report, folder)
        report["json"] = str(json_path)
        report["table"] = table
    return report


# ---- training ------------------------------------------------------------------------------------------------


def train_run(
    recipe: Recipe,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Load the model and data of ``recipe``, `stanvid.training.loop.fit` it into ``out_dir`` (default
    ``train.output_dir``), evaluating on the test split every ``train.eval_every`` epochs and after the last."""
    with _process_group(recipe):
        return _train_run(recipe, out_dir, resume, progress)


def _train_run(recipe: Recipe, out_dir: Any, resume: bool, progress: bool) -> TrainResult:
    rank, _ = rank_world()
    model = load_run_model(recipe)
    pre = model.config.clip.preprocess  # frames normalized as this CLIP was trained
    tok = model.text_tokenizer()  # each model reads its own tokenizer's ids
    train_set = build_dataset(recipe, "train", preprocess=pre, tokenizer=tok)
    test_set = (
        build_dataset(recipe, "test", preprocess=pre, tokenizer=tok) if recipe.data.test_annotations else None
    )

    def eval_fn(trained: nn.Module, epoch: int, head: nn.Module | None) -> dict[str, Any]:
        scale = _recipe_scale(recipe, trained)
        metrics = evaluate_model(trained, test_set, recipe, head=head, logit_scale=scale)
        if rank == 0:
            print(f"epoch {epoch}:\n{format_table(metrics)}", flush=True)
        return metrics

    out = Path(out_dir) if out_dir is not None else Path(recipe.train.output_dir)
    return fit(
        model,
        train_set,
        recipe,
        out_dir=out,
        resume=resume,
        progress=progress,
        eval_fn=eval_fn if test_set is not None else None,
    )


# ---- dry run -------------------------------------------------------------------------------------------------


def _check_first_of_each_shard(dataset: Any, ann: RetrievalAnnotations | RecognitionAnnotations) -> None:
    """Decode the first sample of every shard of a split read from shards (raises naming the sample)."""
    seen = set()
    for i, name in enumerate(ann.video_paths):
        shard = name.rpartition(":")[0]
        if shard not in seen:
            seen.add(shard)
            dataset[i]  # a VideoReadError names the sample


def _describe_split(ann: RetrievalAnnotations | RecognitionAnnotations) -> str:
    if isinstance(ann, RetrievalAnnotations):
        return f"{ann.num_captions} captions of {ann.num_videos} videos"
    classes = len(ann.classes) if ann.classes else int(np.max(ann.labels)) + 1
    return f"{len(ann)} videos in {classes} classes"


def check_run(recipe: Recipe, *, resume: bool = False) -> str:
    """Validate a run without training: read every annotation file, find every video file, load the model
    source, check that model and data settings fit; returns a report (raises on the first problem)."""
    d, t = recipe.data, recipe.train
    lines = []
    world = launch_world_size()
    batches, train_items = None, 0
    for split in SPLITS:
        name = d.train_annotations if split == "train" else d.test_annotations
        if not name:
            lines.append(f"{split:<7} (no {split} annotations)")
            continue
        if d.dataset == "webdataset" and split == "train":
            lines.append(f"{split:<7} webdataset: streamed from {name}")
            shard_lines, batches = check_shards(build_dataset(recipe, split), recipe, world)
            lines += shard_lines
            continue
        ann = load_split(recipe, split)
        dataset = build_dataset(recipe, split, ann)
        if split == "train":
            batches = len(dataset) // (t.batch_size * world)
            train_items = len(dataset)
        if ann.sources is not None:  # shards: the first sample of each decodes
            _check_first_of_each_shard(dataset, ann)
        folder = d.video_dir if split == "train" or d.test_video_dir is None else d.test_video_dir
        where = f"{d.path(name)}; videos in {d.path(folder)}" if ann.sources is None else str(name)
        lines.append(f"{split:<7} {d.dataset}: {_describe_split(ann)} ({where})")
    model = load_run_model(recipe)  # after the data: a named OpenAI model may be downloaded here
    n_params = sum(p.numel() for p in model.parameters())
    n_new = sum(p.numel() for name, p in model.named_parameters() if model.is_new_parameter(name))
    cfg = model.config
    lines.insert(
        0,
        f"model   {recipe.model.source}: {cfg.temporal}"
        + (f" (depth {cfg.stan.depth}, {cfg.stan.time_module})" if cfg.temporal == "stan" else "")
        + (f", Mug head {cfg.mug_mode} (tau {cfg.mug_tau:g})" if cfg.similarity == "mug" else "")
        + f", {cfg.num_frames} frames, image {cfg.clip.vision.image_size}, "
        f"{n_params / 1e6:.1f}M parameters ({n_new / 1e6:.1f}M new, lr x{recipe.optim.new_param_lr_mult:g})",
    )
    if batches is not None:
        if batches == 0:
            raise ConfigError(
                f"train.batch_size {t.batch_size} x {world} process(es) exceeds the {train_items} training items"
            )
        accum = recipe.optim.accumulation_steps
        steps = optimizer_steps_per_epoch(batches, recipe)
        limit = f", stopping at train.max_steps {t.max_steps}" if t.max_steps else ""
        kind = f" {recipe.optim.accumulation}" if accum > 1 and recipe.task == "retrieval" else ""
        lines.append(
            f"steps   {steps} per epoch x {t.epochs} epochs = {steps * t.epochs} optimizer steps "
            f"({t.batch_size} videos per process x {world} process(es) x {accum}{kind} accumulation = "
            f"{t.batch_size * world * accum} per step{limit})"
        )
    device = default_device()
    precision = effective_precision(t.precision, device)
    note = precision_note(t.precision, device)
    lines.append(f"device  {device}, precision {precision}" + (f" ({note})" if note else ""))
    out = Path(t.output_dir)
    found = latest_checkpoint(out)
    refuse_checkpoints_unless_resuming(out, found, resume)
    state = f"resumes from {found.name}" if found is not None else "new run"
    lines.append(f"output  {out} ({state})")
    return "\n".join(lines)

"""The training loop: `fit(model, train_set, recipe)` on one process or under torchrun, resumable exactly.

What one optimizer step does (the official STAN recipe, ``configs/exp/stan/stan_*_hf.py``):

* **Retrieval**: encode the batch's videos and captions, gather both over all ranks with gradient and take the
  symmetric InfoNCE over the global batch, the two directions summed (`stanvid.training.losses.contrastive_loss`). The
  temperature is fixed (logit scale ``1 / tau``, as the official configs set it) or learned like CLIP's
  (``train.temperature: learnable``; the log scale is clamped at ``ln 100`` as CLIP does).
* **Recognition**: the class names are encoded once by the text encoder, which stays frozen, and the video side
  is trained with cross-entropy against those text embeddings at the same logit scale (the official
  recognizer's ``task="recognition"``), or through a linear head (``model.classifier: linear``) initialised to
  that text classifier, so it starts from the zero-shot solution (unverified choice: the paper gives no head).
* **AdamW** with parameter groups: CLIP's parameters at ``optim.lr``, the new ones
  (``model.is_new_parameter``: the STAN branch, seqTransf; and a linear head) at ``lr x new_param_lr_mult``;
  weight decay per ``optim.no_decay`` (see `param_groups`); the learnable temperature is never decayed.
* **Schedule**, per optimizer step: a linear ramp from ``warmup_start_factor`` to 1 over ``warmup_epochs``,
  then cosine or constant (`LRSchedule`; the official retrieval recipes ramp over the whole run).
* Gradient accumulation over ``accumulation_steps`` micro-batches: for retrieval exact by default
  (``optim.accumulation: exact``: one contrastive loss over all micro-batches of all ranks, through cached
  embeddings, `Trainer.accumulate_exact`), or ``independent`` (each micro-batch its own contrastive loss);
  global-norm clipping at ``optim.grad_clip``; mixed precision per `effective_precision` (bf16 autocast on CUDA
  and on a CPU with native bf16; fp16 autocast with a ``GradScaler`` on CUDA and the CPU, skipped steps counted
  in the log; fp32 weights always); gradient checkpointing per ``model.grad_checkpointing``.
* A NaN or infinite loss in fp32 or bf16 stops the run with the step and the batch's video files named; no
  checkpoint is written after it, so the last one is the last good state.

**Distributed.** Under torchrun (``WORLD_SIZE > 1``) the process group is initialised from the environment
(NCCL on GPUs, gloo on the CPU; several nodes need only torchrun's rendezvous flags) and the model is wrapped
in ``DistributedDataParallel``. The gradients are exactly those of one process holding the global batch:
`stanvid.training.losses.all_gather_with_grad` sums the slice gradients of the ranks' identical losses and DDP averages,
so two ranks give the same loss and weights as one (tests/test_train.py). The official code's ``GatherLayer``
instead hands each rank only its own loss's gradient, so its encoder gradients are ``1 / W`` of these on W
GPUs: its gradient clipping at 5 on 8 GPUs acts like clipping at ``5 x 8 = 40`` here. We keep the recipes'
value (5), which clips relative to the true full-batch gradient; set ``optim.grad_clip`` to ``5 * W`` to
reproduce the official clipping on W GPUs exactly.

**Checkpoints and resume.** Every ``checkpoint_every`` optimizer steps and at each epoch end, rank 0 writes
``out_dir/checkpoints/step-XXXXXXXX.pt`` (a temporary file, then ``os.replace``) with the model, the optimizer,
scheduler and scaler states, a linear head, the RNG states of every rank (python, numpy, torch, CUDA), the
data position (epoch and batches done in it), the recipe, the model config and the code version. Data order
is a function of ``(seed, epoch)`` (a seeded permutation, sharded per rank as ``DistributedSampler`` does),
and each item's random draws (frames, crop) come from a generator seeded by ``(seed, epoch, index)`` rather
than a per-worker stream, so ``resume=True`` skips exactly the batches already done and continues with the
same draws: an interrupted-then-resumed run reaches the same weights as an uninterrupted one, bit for bit on
the same machine (tests/test_train.py). Resuming needs the same recipe (apart from bookkeeping such as
``max_steps``, ``output_dir``, logging and evaluation settings) and the same number of processes.

**Logs.** A tqdm bar (rank 0) with loss, learning rate and videos/s; ``out_dir/log.jsonl``, one JSON object per
logged step and per evaluation; TensorBoard under ``out_dir/tensorboard`` when ``train.tensorboard`` is set
and the ``tensorboard`` package is installed; the final weights in ``out_dir/model`` (`stanvid.load_model`
reads them; a linear head is saved beside them as ``head.safetensors``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from stanvid.data.base import format_skipped
from stanvid.distributed import default_device
from stanvid.errors import ConfigError, DatasetError, NonFiniteLossError
from stanvid.fileio import atomic_write_bytes, atomic_write_text
from stanvid.models.heads import eval_mode
from stanvid.training.checkpoint import (
    CHECKPOINT_FORMAT,
    code_version,
    latest_checkpoint,
    load_checkpoint,
    newest_readable_checkpoint,
    write_checkpoint,
)
from stanvid.training.data_order import TrainData, build_data
from stanvid.training.recipe import Recipe
from stanvid.training.state import RunLog, check_resumable, rng_preserved, rng_state, seed_all, set_rng_state
from stanvid.training.trainer import Trainer, precision_note, setup_distributed

__all__ = [
    "fit",
    "TrainResult",
    "HEAD_FILE",
    "optimizer_steps_per_epoch",
    "refuse_checkpoints_unless_resuming",
]

HEAD_FILE = "head.safetensors"


# ---- the loop ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What `fit` did: optimizer ``steps`` in total (a resumed run counts from the start), ``epochs`` completed,
    wall ``seconds`` of this call, the ``last_loss``, the ``history`` of logged steps and evaluations (also of
    the run before a resume), the last ``checkpoint`` written and the ``model_dir`` of the final weights."""

    steps: int
    epochs: int
    seconds: float
    last_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    model_dir: Path | None = None


@dataclass
class _Run:
    """The state `fit`'s steps share: what runs (model, trainer, data), where it is, and what it has logged."""

    model: nn.Module
    recipe: Recipe
    trainer: Trainer
    data: TrainData
    rank: int
    world: int
    device: torch.device
    out: Path | None
    stop_at: int  # the optimizer step to stop after
    epoch: int = 0  # position: epochs done, batches done in the current one, optimizer steps done
    batch_in_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None  # the last checkpoint written (or resumed from)
    last_loss: float | None = None
    skipped: list[Any] = field(default_factory=list)
    log: RunLog | None = None
    bar: Any = None  # tqdm, rank 0 with progress
    window_losses: list[float] = field(default_factory=list)  # since the last log record
    window_videos: int = 0
    window_start: float = field(default_factory=time.perf_counter)


def fit(
    model: nn.Module,
    train_set: Dataset,
    recipe: Recipe,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    class_names: Sequence[str] | None = None,
    eval_fn: Callable[[nn.Module, int, nn.Module | None], dict[str, Any]] | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_set`` as ``recipe`` says (see the module docstring).

    Args:
        model: a `stanvid.VideoCLIP` (any temporal module); left in eval mode on ``device`` at the end.
        train_set: a map-style dataset of dicts, ``{"video": (T, 3, S, S), "tokens" (or "text"): (L,)}`` for
            retrieval, ``{"video", "label": int}`` for recognition (`stanvid.data` datasets yield these), or
            shards streamed by a `stanvid.data.ShardDataset`.
            A dataset with a ``set_epoch_seed(seed, epoch)`` method (`stanvid.data.VideoClipDataset`) draws
            each item's frames and crop from (seed, epoch, index), which makes resumed runs exact.
        recipe: the run; ``recipe.train.batch_size`` is per process.
        out_dir: checkpoints, ``log.jsonl``, ``recipe.yaml`` and the final ``model/``; None writes nothing.
        resume: continue from the newest checkpoint in ``out_dir`` (a fresh start when there is none). Without
            it, an ``out_dir`` that already holds checkpoints is refused rather than overwritten.
        progress: show the tqdm bar (rank 0).
        collate_fn: batch collation; default `stanvid.data.collate_skipping` (drops videos that failed to
            decode with ``on_error="skip"`` and reports them at the end).
        class_names: recognition class names; default ``train_set.annotations.classes``.
        eval_fn: ``(model, epoch, head) -> metrics`` (``head``: the linear head or None) run on every rank
            every ``train.eval_every`` epochs (and after the last); its metrics are logged. The training RNG
            streams are preserved around it.
        device: default `default_device()`.
    """
    started = time.perf_counter()
    rank, world = setup_distributed(recipe.train.dist_timeout_minutes)
    device = torch.device(device) if device is not None else default_device()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ConfigError("resume=True needs out_dir (where the checkpoints are)")
    data = build_data(train_set, recipe, rank, world, device, collate_fn)
    steps_per_epoch = optimizer_steps_per_epoch(data.batches_per_epoch, recipe)
    total_steps = steps_per_epoch * recipe.train.epochs
    max_steps = recipe.train.max_steps
    if class_names is None and recipe.task == "recognition":
        class_names = getattr(getattr(train_set, "annotations", None), "classes", None)
    trainer = Trainer(model, recipe, steps_per_epoch=steps_per_epoch, class_names=class_names, device=device)
    stop_at = min(total_steps, max_steps) if max_steps is not None else total_steps
    run = _Run(model, recipe, trainer, data, rank, world, device, out, stop_at)
    resumed = _resume_or_seed(run, resume)
    _announce(run, resume, resumed)
    run.log = RunLog(out, rank == 0, recipe.train.tensorboard, run.step if resumed else None)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.stop_at, initial=min(run.step, run.stop_at), unit="step", dynamic_ncols=True)
    model.train()
    run.window_start = time.perf_counter()
    try:
        _train_epochs(run, eval_fn)
    finally:
        if run.bar is not None:
            run.bar.close()
        run.log.close()
    model.eval()
    model_dir = _save_final(run)
    if run.skipped and rank == 0:
        print(format_skipped(run.skipped), file=sys.stderr)
    if world > 1:
        dist.barrier()
    return TrainResult(
        steps=run.step,
        epochs=run.epoch,
        seconds=time.perf_counter() - started,
        last_loss=run.last_loss,
        history=run.history,
        checkpoint=run.checkpoint,
        model_dir=model_dir,
    )


def optimizer_steps_per_epoch(batches_per_epoch: int, recipe: Recipe) -> int:
    """Optimizer steps in an epoch of ``batches_per_epoch`` micro-batches (per process): one per
    ``optim.accumulation_steps`` of them, the last taking what is left."""
    return math.ceil(batches_per_epoch / recipe.optim.accumulation_steps)


def refuse_checkpoints_unless_resuming(out: Path | None, checkpoint: Path | None, resume: bool) -> None:
    """A run that does not resume refuses an output folder holding checkpoints (``checkpoint``, the newest)
    rather than overwrite them; `fit` and the dry run (`stanvid.training.runs.check_run`) both ask here."""
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"{out} already holds checkpoints ({checkpoint.name}); resume (--resume) or choose another output folder"
        )


def _choose_checkpoint(out: Path | None, resume: bool, rank: int, world: int) -> tuple[Path | None, Any]:
    """The checkpoint to resume from (and its state, when this rank read it), the same on every rank.

    Rank 0 decides (the newest that reads, when resuming) and broadcasts the path; the other ranks read that
    file themselves (several nodes: ``out_dir`` on a shared filesystem). Without ``resume``, a folder that
    already holds checkpoints is refused.
    """
    checkpoint, saved = None, None
    if out is not None and rank == 0:
        checkpoint, saved = newest_readable_checkpoint(out) if resume else (latest_checkpoint(out), None)
    if world > 1:
        chosen = [checkpoint]
        dist.broadcast_object_list(chosen, src=0)
        checkpoint = chosen[0]
    refuse_checkpoints_unless_resuming(out, checkpoint, resume)
    if checkpoint is not None and saved is None:  # other ranks, or none reads: raises naming the file
        saved = load_checkpoint(checkpoint)
    return checkpoint, saved


def _resume_or_seed(run: _Run, resume: bool) -> bool:
    """Restore the run from its checkpoint (model, trainer, position, history, this rank's RNG streams) when
    resuming from one, else seed this rank's RNG streams; returns whether it resumed."""
    checkpoint, saved = _choose_checkpoint(run.out, resume, run.rank, run.world)
    if checkpoint is None:
        seed_all(run.recipe.train.seed + run.rank)
        return False
    check_resumable(saved, run.recipe, run.world, checkpoint)
    run.model.load_state_dict(saved["model"])
    run.trainer.load_state_dict(saved["trainer"])
    run.epoch, run.batch_in_epoch, run.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
    run.history = list(saved.get("history", []))
    set_rng_state(saved["rng"][run.rank], run.device)
    run.checkpoint = checkpoint
    return True


def _announce(run: _Run, resume: bool, resumed: bool) -> None:
    """Rank 0: say what is not as asked (a fresh start on --resume, fp32 on the CPU); write recipe.yaml."""
    if run.rank != 0:
        return
    recipe = run.recipe
    if resume and not resumed and run.out is not None:
        print(f"no checkpoint in {run.out}: starting from scratch", file=sys.stderr)
    if run.out is not None:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "recipe.yaml", recipe.to_yaml())
    note = precision_note(recipe.train.precision, run.device)
    if note is not None:
        print(note, file=sys.stderr)


def _train_epochs(run: _Run, eval_fn: Callable[..., dict[str, Any]] | None) -> None:
    """Epochs from the run's position until the last epoch or ``stop_at``; each ends with `_end_epoch`."""
    tr = run.recipe.train
    stopped = run.step >= run.stop_at
    while run.epoch < tr.epochs and not stopped:
        run.data.start(run.epoch, run.batch_in_epoch)  # the loader continues after the batches done
        if run.bar is not None:
            run.bar.set_description(f"epoch {run.epoch + 1}/{tr.epochs}")
        if _train_batches(run):
            break
        _end_epoch(run, eval_fn)
        if run.step >= run.stop_at:
            break


def _train_batches(run: _Run) -> bool:
    """The rest of the current epoch's batches, an optimizer step after every ``accumulation_steps`` of them
    (fewer at the epoch's end); returns True when ``stop_at`` was reached inside the epoch.

    Exact accumulation holds the step's micro-batches (on the host) until the last one has arrived, then
    trains on them as one batch; independent micro-batches are trained on as they come."""
    accum, per_epoch = run.recipe.optim.accumulation_steps, run.data.batches_per_epoch
    step_losses: list[float] = []
    group: list[dict[str, Any]] = []
    for batch in run.data.loader:
        _take_skipped(run, batch)
        group_start = (run.batch_in_epoch // accum) * accum
        group_size = min(accum, per_epoch - group_start)
        last_micro = run.batch_in_epoch == group_start + group_size - 1
        exact = run.trainer.exact  # a step of one micro-batch: accumulate_exact hands it to micro_step
        group = [*group, batch] if exact else [batch]
        try:
            if not exact:
                step_losses.append(run.trainer.micro_step(batch, divisor=group_size, sync=last_micro))
            elif last_micro:
                step_losses.append(run.trainer.accumulate_exact(group))
        except NonFiniteLossError as exc:
            raise _diverged(run, group, exc) from None
        run.window_videos += len(batch["video"])
        run.batch_in_epoch += 1
        if not last_micro:
            continue
        _optimizer_step(run, step_losses)
        step_losses, group = [], []
        final = run.step >= run.stop_at
        epoch_done = run.batch_in_epoch == per_epoch  # the epoch end writes its own checkpoint
        every = run.recipe.train.checkpoint_every
        if not epoch_done and (final or (every and run.step % every == 0)):
            run.checkpoint = _save(run, run.epoch, run.batch_in_epoch) or run.checkpoint
        if final:
            return not epoch_done
    return False


def _take_skipped(run: _Run, batch: Any) -> None:
    """Move a batch's skipped-video records to the run's list; a batch with no video left is an error."""
    if isinstance(batch, dict) and "skipped" in batch:
        run.skipped.extend(batch.pop("skipped"))
        if "video" not in batch:
            size = run.recipe.train.batch_size
            raise DatasetError(
                f"every video of a training batch failed to decode:\n{format_skipped(run.skipped[-size:])}"
            )


def _diverged(run: _Run, group: list[dict[str, Any]], exc: NonFiniteLossError) -> NonFiniteLossError:
    """The error that stops a run at a non-finite loss: the step, the batch's video files, the last good
    checkpoint (none is written after the failure: the exception leaves `fit` before any `_save`)."""
    files: list[str] = []
    for batch in group:
        names = batch.get("path", batch.get("video_id"))
        files += [str(n) for n in names] if isinstance(names, (list, tuple)) else []
    shown = ", ".join(files[:16]) + (f" and {len(files) - 16} more" if len(files) > 16 else "")
    videos = f"the batch's videos: {shown}" if files else "the batch's items name no video files ('path')"
    last = latest_checkpoint(run.out) if run.out is not None else None
    if last is not None:
        kept = f"the last good checkpoint, {last}, is intact (check these videos, then --resume from it)"
    else:
        kept = "no checkpoint was written before it"
    last_batch, first_batch = run.batch_in_epoch + 1, run.batch_in_epoch + 2 - len(group)
    batches = f"batch {last_batch}" if len(group) == 1 else f"batches {first_batch}-{last_batch}"
    where = f"epoch {run.epoch + 1}, {batches} of {run.data.batches_per_epoch}"
    return NonFiniteLossError(f"step {run.step + 1} ({where}): {exc}; {videos}. Stopped: {kept}")


def _optimizer_step(run: _Run, step_losses: list[float]) -> None:
    """Step the optimizer on the accumulated gradients; log every ``log_every`` steps and at the last."""
    info = run.trainer.optimizer_step()
    run.step += 1
    run.last_loss = sum(step_losses) / len(step_losses)
    run.window_losses.append(run.last_loss)
    if run.step % run.recipe.train.log_every == 0 or run.step >= run.stop_at:
        record = _log_record(
            run.trainer,
            run.step,
            run.epoch,
            run.batch_in_epoch / run.data.batches_per_epoch,
            run.window_losses,
            run.window_videos * run.world,
            time.perf_counter() - run.window_start,
            info,
        )
        _record(run, record)
        if run.bar is not None:
            run.bar.set_postfix(
                loss="nan" if record["loss"] is None else f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                vid_s=f"{record['videos_per_s']:.1f}",
            )
        run.window_losses, run.window_videos, run.window_start = [], 0, time.perf_counter()
    if run.bar is not None:
        run.bar.update(1)


def _record(run: _Run, record: dict[str, Any]) -> None:
    run.history.append(record)
    assert run.log is not None
    run.log.write(record)


def _end_epoch(run: _Run, eval_fn: Callable[..., dict[str, Any]] | None) -> None:
    """Close an epoch: evaluate (every ``eval_every`` epochs, and after the last), then checkpoint."""
    tr = run.recipe.train
    run.epoch += 1
    run.batch_in_epoch = 0
    last_epoch = run.epoch == tr.epochs or run.step >= run.stop_at
    if eval_fn is not None and ((tr.eval_every and run.epoch % tr.eval_every == 0) or last_epoch):
        with rng_preserved(run.device), eval_mode(run.model, run.trainer.head):
            metrics = eval_fn(run.model, run.epoch, run.trainer.head)
        _record(run, {"step": run.step, "epoch": run.epoch, "eval": metrics})
    run.checkpoint = _save(run, run.epoch, 0) or run.checkpoint


def _save(run: _Run, position_epoch: int, position_batch: int) -> Path | None:
    """Checkpoint the run at this data position (rank 0 writes; every rank contributes its RNG states).

    Returns the path written on rank 0, None elsewhere or without ``out_dir``."""
    if run.out is None:
        return None
    states = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(states, rng_state(run.device))
    else:
        states = [rng_state(run.device)]
    if run.rank != 0:
        return None
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "trainer": run.trainer.state_dict(),
        "rng": states,
        "epoch": position_epoch,
        "batch_in_epoch": position_batch,
        "step": run.step,
        "world_size": run.world,
        "history": run.history,
        "recipe": run.recipe.to_dict(),
        "model_config": run.model.config.to_dict(),
        "version": code_version(),
    }
    return write_checkpoint(state, run.out, run.step, run.recipe.train.keep_checkpoints)


def _save_final(run: _Run) -> Path | None:
    """Rank 0: the final weights in ``out_dir/model`` (`stanvid.load_model` reads them), a linear head beside
    them as `HEAD_FILE`; returns that folder (None elsewhere or without ``out_dir``)."""
    if run.rank != 0 or run.out is None:
        return None
    model_dir = run.out / "model"
    run.model.save_pretrained(model_dir)
    head = run.trainer.head
    if head is not None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        atomic_write_bytes(model_dir / HEAD_FILE, save(tensors))
    return model_dir


def _log_record(
    trainer: Trainer,
    step: int,
    epoch: int,
    epoch_fraction: float,
    losses: list[float],
    videos: int,
    seconds: float,
    info: dict[str, float],
) -> dict[str, Any]:
    loss, mean = losses[-1], sum(losses) / len(losses)
    if trainer.task == "recognition" and trainer.world > 1:
        # the recognition loss is per rank (the contrastive loss is already global): average it for the log
        both = torch.tensor([loss, mean], dtype=torch.float64, device=trainer.device)
        dist.all_reduce(both)
        loss, mean = (both / trainer.world).tolist()
    record = {
        "step": step,
        "epoch": round(epoch + epoch_fraction, 4),
        "loss": _finite_or_none(loss),  # an fp16 step the scaler skipped may have an infinite loss
        "loss_avg": _finite_or_none(mean),
        "lr": info["lr"],
        "lr_new": info["lr_new"],
        "grad_norm": _finite_or_none(info["grad_norm"]),
        "logit_scale": trainer.scale_value(),
        "videos_per_s": videos / max(seconds, 1e-9),
    }
    if trainer.sigmoid:  # the sigmoid loss's learned bias
        record["logit_bias"] = float(trainer.model.logit_bias.detach())
    if "loss_scale" in info:  # fp16: the scaler's scale after this step, and the steps it skipped so far
        record.update(loss_scale=info["loss_scale"], skipped_steps=trainer.skipped_steps)
    return record


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: the log writes null for them."""
    return value if math.isfinite(value) else None

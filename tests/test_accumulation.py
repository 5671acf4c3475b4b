"""Exact gradient accumulation of the contrastive losses against the one big batch it stands for.

Second paths: one process with the whole global batch in one step; 2 gloo ranks; a reference that keeps every
micro-batch's graph (what exact accumulation computes without the memory saving), for the keyed drop-path
masks and the RNG replay. With drop-path on (the recipes' 0.1), the masks are keyed on (seed, step, sample
index), so micro-batches, ranks and one big batch draw the same ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stanvid.distributed import leave_process_group
from stanvid.errors import ConfigError
from stanvid.models.stan import DropPath, SampleKeys, sample_keys
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.loop import fit
from stanvid.training.recipe import Recipe
from stanvid.training.state import check_resumable
from stanvid.training.trainer import Trainer
from testkit import tiny_config
from trainkit import FRAMES, SIZE, PaddedRetrieval, recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)

MUG_MODE = "mug_frame_token_simple"
ITEMS = 24  # three optimizer steps of a global batch of 8
KINDS = [("stan", False), ("stan", True), ("mug", False), ("mug", True)]  # (head, gradient checkpointing)
DROP_PATH = 0.1  # the recipes' own (over the branch's layers)
DROP_KINDS = [("stan", False), ("stan", True), ("mug", False)]  # trained with drop-path on as well


def _model(kind: str, drop_path: float = 0.0) -> VideoCLIP:
    """STAN (or the Mug head on STAN) with drop-path ``drop_path`` over the branch."""
    torch.manual_seed(3)
    extra = {"similarity": "mug", "mug_mode": MUG_MODE} if kind == "mug" else {}
    return VideoCLIP(tiny_config(frames=FRAMES, image=SIZE, stan={"drop_path": drop_path}, **extra))


def _recipe(kind: str, batch: int, accum: int, checkpointing: bool, mode: str = "exact") -> Recipe:
    model = {"grad_checkpointing": checkpointing}
    if kind == "mug":
        model.update(similarity="mug", mug_mode=MUG_MODE)
    return recipe(
        model=model,
        train={"epochs": 1, "batch_size": batch, "temperature": "learnable"},
        # eps 1e-3: AdamW's update of a parameter whose gradient is rounding noise stays of that noise's size
        optim={
            "lr": 1e-4,
            "warmup_epochs": 0.0,
            "eps": 1e-3,
            "accumulation_steps": accum,
            "accumulation": mode,
        },
    )


def _train(
    kind: str, batch: int, accum: int, checkpointing: bool, mode: str = "exact", drop_path: float = 0.0
) -> dict:
    model = _model(kind, drop_path)
    result = fit(
        model, PaddedRetrieval(ITEMS), _recipe(kind, batch, accum, checkpointing, mode), progress=False
    )
    assert result.steps == 3
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"weights": weights, "losses": [h["loss"] for h in result.history]}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.fixture(scope="module")
def one_big_batch() -> dict:
    """Per (head, checkpointing): 3 steps of one batch of 8, and the distance the weights moved from the start.
    (Module fixtures are set up before the `one_thread` fixture: this one sets its own thread count.)"""
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, checkpointing in KINDS:
            run = _train(kind, 8, 1, checkpointing)
            run["moved"] = _max_diff(run["weights"], _model(kind).state_dict())
            runs[kind, checkpointing] = run
        for kind, checkpointing in DROP_KINDS:
            run = _train(kind, 8, 1, checkpointing, drop_path=DROP_PATH)
            run["moved"] = _max_diff(run["weights"], _model(kind).state_dict())
            run["masks"] = _max_diff(run["weights"], runs[kind, checkpointing]["weights"])
            runs[kind, checkpointing, "drop-path"] = run
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("kind, checkpointing", KINDS)
def test_batch_2_x_4_exact_micro_batches_equal_batch_8_in_one_step(one_big_batch, kind, checkpointing):
    """One process: 4 exact micro-batches of 2 per step reach the weights of one batch of 8 (3 steps, learned
    temperature); 4 independent ones (each its own contrastive problem) do not."""
    big = one_big_batch[kind, checkpointing]
    exact = _train(kind, 2, 4, checkpointing)
    independent = _train(kind, 2, 4, checkpointing, mode="independent")
    diff, off = _max_diff(exact["weights"], big["weights"]), _max_diff(independent["weights"], big["weights"])
    print(
        f"{kind} checkpointing={checkpointing}: moved {big['moved']:.3g}, exact {diff:.3g}, independent {off:.3g}"
    )
    assert diff < 1e-5
    assert off > 0.1 * big["moved"]  # the test can tell: accumulating independently changes the result
    assert exact["losses"] == pytest.approx(big["losses"], rel=1e-5)  # the loss of the whole batch


@pytest.mark.parametrize("kind, checkpointing", DROP_KINDS)
def test_with_drop_path_batch_2_x_4_exact_micro_batches_equal_batch_8(one_big_batch, kind, checkpointing):
    """Drop-path 0.1 on: 4 exact micro-batches of 2 reach the weights of one batch of 8 within float rounding,
    since every sample draws its masks from (seed, step, its index in the global batch); the masks matter
    (without drop-path the weights end elsewhere)."""
    big = one_big_batch[kind, checkpointing, "drop-path"]
    exact = _train(kind, 2, 4, checkpointing, drop_path=DROP_PATH)
    diff = _max_diff(exact["weights"], big["weights"])
    print(f"{kind} checkpointing={checkpointing} drop-path {DROP_PATH}: moved {big['moved']:.3g}, ", end="")
    print(f"exact {diff:.3g}, drop-path off {big['masks']:.3g}")
    assert diff < 1e-6
    assert big["masks"] > 0.1 * big["moved"]
    assert exact["losses"] == pytest.approx(big["losses"], rel=1e-5)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clean = False
    try:
        runs = {f"{kind}-{checkpointing}": _train(kind, 2, 2, checkpointing) for kind, checkpointing in KINDS}
        for kind, checkpointing in DROP_KINDS:  # 2 ranks x (1 x 4): micro-batches of one video
            runs[f"{kind}-{checkpointing}-drop-path"] = _train(kind, 1, 4, checkpointing, drop_path=DROP_PATH)
        torch.save(runs, f"{out}/rank{rank}.pt")
        clean = True
    finally:
        leave_process_group(clean)  # waits for the other rank after a clean run


def test_two_gloo_ranks_x_batch_2_x_2_exact_micro_batches_equal_batch_8(one_big_batch, tmp_path, free_port):
    """Global batch 8 as 2 ranks x 2 exact micro-batches x 2 videos, for STAN and the Mug head, gradient
    checkpointing on and off: the weights of one process with the batch of 8 after 3 steps, on both ranks.
    With drop-path 0.1, 2 ranks x 4 exact micro-batches of 1 video: the same, within float rounding."""
    mp.spawn(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        runs = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for kind, checkpointing in KINDS:
            big, got = one_big_batch[kind, checkpointing], runs[f"{kind}-{checkpointing}"]
            diff = _max_diff(got["weights"], big["weights"])
            print(
                f"rank {rank} {kind} checkpointing={checkpointing}: moved {big['moved']:.3g}, 2 ranks {diff:.3g}"
            )
            assert diff < 1e-5
            assert got["losses"] == pytest.approx(big["losses"], rel=1e-5)
        for kind, checkpointing in DROP_KINDS:
            big, got = (
                one_big_batch[kind, checkpointing, "drop-path"],
                runs[f"{kind}-{checkpointing}-drop-path"],
            )
            diff = _max_diff(got["weights"], big["weights"])
            print(
                f"rank {rank} {kind} checkpointing={checkpointing} drop-path: moved {big['moved']:.3g}, {diff:.3g}"
            )
            assert diff < 1e-6
            assert got["losses"] == pytest.approx(big["losses"], rel=1e-5)


# ---- randomness inside the forward pass ----------------------------------------------------------------------


def _noisy_model(kind: str) -> VideoCLIP:
    """Drop-path 0.3 in STAN, its zero-initialised output layers made nonzero so the masks change the output."""
    model = _model(kind, drop_path=0.3)
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if name.startswith("temporal.") and name.endswith("fc.weight"):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def _micro_batches(n: int = 4, size: int = 2) -> list[dict]:
    data = PaddedRetrieval(n * size, seed=6)
    return [
        {"video": data.videos[i : i + size], "tokens": data.tokens[i : i + size]}
        for i in range(0, n * size, size)
    ]


def _reference_grads(trainer: Trainer, batches: list[dict], step: int | None = 0) -> list[torch.Tensor]:
    """Every micro-batch forwarded with autograd in turn, its drop-path keyed as the trainer keys it at optimizer
    step ``step`` (None: masks drawn from torch's generator), one loss over all the features, one backward: the
    gradient exact accumulation stands for, at k times the memory."""
    outs, offset = [], 0
    for b in batches:
        keys = trainer.drop_path_keys(offset, len(b["video"]))
        with sample_keys(None if step is None else SampleKeys(keys.seed, step, keys.index)):
            outs.append(trainer.forward_module(b["video"], b["tokens"]))
        offset += len(b["video"])
    video = torch.cat([o[0] for o in outs])
    text = torch.cat([o[1] for o in outs])
    loss = trainer._loss_of((video, text, *outs[-1][2:]), torch.cat([b["tokens"] for b in batches]), None)
    return torch.autograd.grad(loss, trainer.params, allow_unused=True)


def _compare_grads(trainer: Trainer, reference: list, other: list) -> tuple[float, float]:
    """Largest relative difference of the trainer's gradients from ``reference``, and of ``other`` from it."""
    worst = apart = 0.0
    for param, want, redrawn in zip(trainer.params, reference, other, strict=True):
        if want is None:
            assert param.grad is None or not param.grad.any()
            continue
        scale = float(want.abs().max()) + 1e-12
        worst = max(worst, float((param.grad - want).abs().max()) / scale)
        apart = max(apart, float((redrawn - want).abs().max()) / scale)
    return worst, apart


@pytest.mark.parametrize("kind, checkpointing", [("stan", False), ("stan", True), ("mug", True)])
def test_drop_path_masks_are_keyed_on_the_samples(kind, checkpointing):
    """With drop-path active, the exact step's gradients equal the keep-every-graph reference keyed on the same
    (seed, step, sample indices), whatever torch's generator holds, and torch's generator is left untouched;
    the reference keyed on another step differs (the masks matter)."""
    batches = _micro_batches()
    trainer = Trainer(_noisy_model(kind), _recipe(kind, 2, 4, checkpointing), steps_per_epoch=1, device="cpu")
    torch.manual_seed(11)
    reference = _reference_grads(trainer, batches)
    other_step = _reference_grads(trainer, batches, step=1)
    torch.manual_seed(12)
    before = torch.get_rng_state()
    trainer.accumulate_exact(batches)
    assert torch.equal(torch.get_rng_state(), before)
    worst, other = _compare_grads(trainer, reference, other_step)
    print(
        f"{kind} checkpointing={checkpointing}: exact vs reference {worst:.2g}, other step's masks {other:.2g}"
    )
    assert worst < 1e-4
    assert other > 1e-2


def _generator_drop_path(monkeypatch) -> None:
    """Drop-path that ignores the keys and draws from torch's generator: randomness the replay must handle."""
    keyed = DropPath.forward
    monkeypatch.setattr(DropPath, "forward", lambda self, x, keys=None: keyed(self, x, None))


@pytest.mark.parametrize("kind, checkpointing", [("stan", False), ("mug", True)])
def test_generator_randomness_replays_in_the_second_pass(monkeypatch, kind, checkpointing):
    """Randomness drawn from torch's generator in the forward pass (drop-path made to draw so here): the exact
    step's gradients equal the keep-every-graph reference drawn from the same RNG state, and the generator ends
    where the reference leaves it; a reference drawn from another state differs, so the replay is what makes
    them equal."""
    _generator_drop_path(monkeypatch)
    batches = _micro_batches()
    trainer = Trainer(_noisy_model(kind), _recipe(kind, 2, 4, checkpointing), steps_per_epoch=1, device="cpu")
    torch.manual_seed(11)
    reference = _reference_grads(trainer, batches, step=None)
    after_reference = torch.get_rng_state()
    torch.manual_seed(12)
    other_masks = _reference_grads(trainer, batches, step=None)

    torch.manual_seed(11)
    trainer.accumulate_exact(batches)
    assert torch.equal(torch.get_rng_state(), after_reference)
    worst, other = _compare_grads(trainer, reference, other_masks)
    print(f"{kind} checkpointing={checkpointing}: exact vs reference {worst:.2g}, other masks {other:.2g}")
    assert worst < 1e-4
    assert other > 1e-2


def test_randomness_the_generators_do_not_drive_is_refused(monkeypatch):
    """A forward pass that draws from elsewhere (numpy here) cannot be replayed: the step fails, saying so."""

    def numpy_drop_path(self, x, keys=None):
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.from_numpy((np.random.rand(x.shape[0]) < keep).astype(np.float32))
        return x * mask.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) / keep

    monkeypatch.setattr(DropPath, "forward", numpy_drop_path)
    trainer = Trainer(_noisy_model("stan"), _recipe("stan", 2, 4, False), steps_per_epoch=1, device="cpu")
    with pytest.raises(ConfigError, match="cannot be replayed.*optim.accumulation: independent"):
        trainer.accumulate_exact(_micro_batches())


def test_keyed_masks_follow_the_sample_not_its_position():
    """A sample's mask depends on its keys alone: the rows of a batch keyed 0..7 are those of the same samples
    keyed in any order and in any split; the keep rate is 1 - rate; seed, step and layer each change the masks;
    eval mode and rate 0 leave the input as it is."""
    rows_per_sample, keep = 50, 0.9
    keys = SampleKeys(7, 3, torch.arange(8))
    whole = keys.keep_mask(2, 8 * rows_per_sample, keep, torch.device("cpu")).view(8, rows_per_sample)
    order = torch.tensor([5, 0, 7, 2])
    part = SampleKeys(7, 3, order).keep_mask(2, 4 * rows_per_sample, keep, torch.device("cpu"))
    assert torch.equal(part.view(4, rows_per_sample), whole[order])
    many = SampleKeys(0, 0, torch.arange(4000)).keep_mask(
        0, 4000 * rows_per_sample, keep, torch.device("cpu")
    )
    assert abs(many.float().mean().item() - keep) < 0.003  # 200,000 rows: 4 standard deviations is 0.0027
    for other in (SampleKeys(8, 3, keys.index), SampleKeys(7, 4, keys.index)):
        assert not torch.equal(
            other.keep_mask(2, 8 * rows_per_sample, keep, torch.device("cpu")), whole.flatten()
        )
    assert not torch.equal(keys.keep_mask(3, 8 * rows_per_sample, keep, torch.device("cpu")), whole.flatten())
    with pytest.raises(ValueError, match="7 rows for a batch of 8"):
        keys.keep_mask(0, 7, keep, torch.device("cpu"))
    x = torch.randn(8, 3)
    assert DropPath(0.5).eval()(x, keys) is x
    assert DropPath(0.0).train()(x, keys) is x
    dropped = DropPath(0.5).train()(x, keys)
    assert torch.equal(DropPath(0.5).train()(x, keys), dropped)
    assert set((dropped / x).flatten().round(decimals=4).tolist()) <= {0.0, 2.0}


# ---- the recipe ----------------------------------------------------------------------------------------------


def test_accumulation_kind_is_validated_and_checked_on_resume(tmp_path):
    with pytest.raises(ConfigError, match="optim.accumulation: 'approximate' is not a valid choice"):
        recipe(optim={"accumulation": "approximate"})
    old = recipe(optim={"accumulation_steps": 2}).to_dict()
    del old["optim"]["accumulation"]  # a checkpoint from before the key: independent micro-batches
    saved = {"recipe": old, "world_size": 1}
    with pytest.raises(ConfigError, match="optim.accumulation: 'independent' -> 'exact'"):
        check_resumable(saved, recipe(optim={"accumulation_steps": 2}), 1, tmp_path / "step-1.pt")
    check_resumable(
        saved, recipe(optim={"accumulation_steps": 2, "accumulation": "independent"}), 1, tmp_path
    )
    one = recipe().to_dict()
    del one["optim"]["accumulation"]
    check_resumable({"recipe": one, "world_size": 1}, recipe(), 1, tmp_path)  # one micro-batch: the same

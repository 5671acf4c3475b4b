"""SigLIP's sigmoid loss (`train.loss: sigmoid`): the formula against a direct computation, 2 gloo ranks against 1
process (the loss alone, and whole training runs), exact accumulation against one batch, the learned bias
(created, trained, saved and loaded) and the recipe key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stanvid
from stanvid.distributed import leave_process_group
from stanvid.errors import ConfigError
from stanvid.training.checkpoint import latest_checkpoint, load_checkpoint
from stanvid.training.loop import fit
from stanvid.training.losses import sigmoid_loss
from stanvid.training.trainer import SIGLIP_BIAS_INIT, Trainer
from trainkit import PaddedRetrieval, assert_close_runs, recipe, train_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def _reference_sigmoid(video: torch.Tensor, text: torch.Tensor, scale: float, bias: float) -> float:
    """-sum_ij log sigmoid(z_ij (scale cos_ij + bias)) / n, written out element by element in float64."""

    def unit(row: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    v = [unit(row) for row in video.double().tolist()]
    t = [unit(row) for row in text.double().tolist()]
    n, total = len(v), 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * sum(a * b for a, b in zip(v[i], t[j], strict=True)) + bias
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / n


def test_sigmoid_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
    for scale, bias in ((10.0, -10.0), (1.0, 0.0), (117.3, -12.9), (20.0, 3.0)):
        got = sigmoid_loss(video, text, scale, bias)
        assert got.item() == pytest.approx(_reference_sigmoid(video, text, scale, bias), rel=1e-5, abs=1e-6)
    assert stanvid.sigmoid_loss is sigmoid_loss


def test_sigmoid_loss_scale_and_bias_get_their_gradients():
    g = torch.Generator().manual_seed(1)
    video, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor([-4.0], requires_grad=True)  # Hugging Face's SigLIP keeps a (1,) bias
    loss = sigmoid_loss(video, text, log_scale.exp(), bias)
    assert loss.item() == pytest.approx(_reference_sigmoid(video, text, 10.0, -4.0), rel=1e-5)
    loss.backward()
    eps = 1e-3
    with torch.no_grad():
        for param, got in ((log_scale, log_scale.grad), (bias, bias.grad)):
            saved = param.clone()
            param += eps
            up = sigmoid_loss(video, text, log_scale.exp(), bias)
            param -= 2 * eps
            down = sigmoid_loss(video, text, log_scale.exp(), bias)
            param.copy_(saved)
            assert got.item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-2)


def test_sigmoid_loss_rejects_bad_input_and_is_float32_under_autocast():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="pair up"):
        sigmoid_loss(x, torch.randn(2, 4), 10.0, -10.0)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        sigmoid_loss(x, x, 10.0, torch.zeros(2))
    with pytest.raises(ConfigError, match="logit_bias must be a finite number"):
        sigmoid_loss(x, x, 10.0, float("nan"))
    with pytest.raises(ConfigError, match="logit_scale"):
        sigmoid_loss(x, x, 0.0, -10.0)
    expected = sigmoid_loss(x, x, 10.0, -10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sigmoid_loss(x, x, 10.0, -10.0)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


# ---- training: one batch, exact accumulation, 2 ranks ------------------------------------------------------

ITEMS = 16  # two optimizer steps of a global batch of 8


def _recipe(batch: int, accum: int, mode: str = "exact", loss: str = "sigmoid"):
    # eps 1e-3: AdamW's update of a parameter whose gradient is rounding noise stays of that noise's size
    return recipe(
        train={"epochs": 1, "batch_size": batch, "temperature": "learnable", "loss": loss},
        optim={
            "lr": 1e-4,
            "warmup_epochs": 0.0,
            "eps": 1e-3,
            "accumulation_steps": accum,
            "accumulation": mode,
        },
    )


def _run(batch: int, accum: int, out: Path, mode: str = "exact", loss: str = "sigmoid") -> dict:
    """Two steps of a tiny STAN model (drop-path 0.1, keyed) on a CLIP-like model without a bias: the state of
    its last checkpoint."""
    fit(
        train_model(seed=3, stan={"drop_path": 0.1}),
        PaddedRetrieval(ITEMS),
        _recipe(batch, accum, mode, loss),
        out_dir=out,
        progress=False,
    )
    return load_checkpoint(latest_checkpoint(out))


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory) -> dict:
    """One process, one batch of 8 per step. (Module fixtures are set up before `one_thread`.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(8, 1, tmp_path_factory.mktemp("one-batch"))
    finally:
        torch.set_num_threads(threads)


def test_exact_accumulation_equals_one_batch_and_the_bias_is_trained(one_batch, tmp_path):
    """4 exact micro-batches of 2 give the weights, AdamW moments and learned scale and bias of one batch of 8;
    independent micro-batches (each its own sigmoid problem) do not; the bias started at SigLIP's -10 and moved,
    and the logged steps show it."""
    exact = _run(2, 4, tmp_path / "exact")
    assert_close_runs(exact, one_batch)
    independent = _run(2, 4, tmp_path / "independent", mode="independent")

    def apart(state: dict) -> float:
        return max(float((state["model"][k] - v).abs().max()) for k, v in one_batch["model"].items())

    print(f"weights vs one batch of 8: exact {apart(exact):.2g}, independent {apart(independent):.2g}")
    assert apart(independent) > 100 * apart(exact)  # the test can tell the two apart
    bias = float(one_batch["model"]["logit_bias"])
    assert bias != SIGLIP_BIAS_INIT and abs(bias - SIGLIP_BIAS_INIT) < 1e-2  # lr 1e-4 x 2 Adam steps
    logged = [h["logit_bias"] for h in one_batch["history"] if "logit_bias" in h]
    assert logged and logged[-1] == pytest.approx(bias)


_SIZES = (4, 2)  # unequal local batches also exercise the padded gather


def _problem():
    g = torch.Generator().manual_seed(123)
    n = sum(_SIZES)
    x_video, x_text = torch.randn(n, 7, generator=g), torch.randn(n, 7, generator=g)
    w_video, w_text = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    return x_video, x_text, w_video, w_text, torch.tensor(math.log(10.0)), torch.tensor(-3.0)


def _step(x_video, x_text, w_video, w_text, log_scale, bias):
    params = [p.clone().requires_grad_() for p in (w_video, w_text, log_scale, bias)]
    loss = sigmoid_loss(x_video @ params[0].T, x_text @ params[1].T, params[2].exp(), params[3])
    loss.backward()
    return loss.detach(), [p.grad for p in params]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clean = False
    try:
        x_video, x_text, *weights = _problem()
        local = slice(sum(_SIZES[:rank]), sum(_SIZES[: rank + 1]))
        loss, grads = _step(x_video[local], x_text[local], *weights)
        for grad in grads:  # what DDP does: average the parameter gradients over the ranks
            dist.all_reduce(grad)
            grad /= world
        torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
        _run(2, 2, Path(out) / "ddp")  # 2 ranks x 2 exact micro-batches x 2 videos
        clean = True
    finally:
        leave_process_group(clean)  # waits for the other rank after a clean run


def test_two_gloo_ranks_equal_one_process(one_batch, tmp_path, free_port):
    """The loss and its gradients (encoders, scale, bias) on 2 ranks with unequal local batches are those of one
    process with the whole batch; a training run on 2 ranks x 2 exact micro-batches of 2 ends with the weights
    of one process with batches of 8."""
    world = len(_SIZES)
    mp.spawn(_worker, args=(world, free_port, str(tmp_path)), nprocs=world, join=True)
    loss, grads = _step(*_problem())
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss, rtol=1e-6, atol=1e-6)
        for name, g_dist, g_one in zip(
            ("w_video", "w_text", "scale", "bias"), got["grads"], grads, strict=True
        ):
            torch.testing.assert_close(g_dist, g_one, rtol=1e-5, atol=1e-6, msg=name)
    assert_close_runs(load_checkpoint(latest_checkpoint(tmp_path / "ddp")), one_batch)


# ---- the bias, the parameter groups and the recipe --------------------------------------------------------


def test_the_bias_is_created_kept_grouped_and_saved(tmp_path):
    """A model without a bias gets SigLIP's -10 under the sigmoid loss; a model with one (a SigLIP checkpoint's)
    keeps its value; it is not decayed and not a 'new' parameter (as the logit scale); save_pretrained writes
    it and load_model reads it back; the InfoNCE loss leaves a model's bias frozen."""
    model = train_model(seed=3)
    assert model.logit_bias is None
    trainer = Trainer(model, _recipe(8, 1), steps_per_epoch=2, device="cpu")
    assert float(model.logit_bias.detach()) == SIGLIP_BIAS_INIT and model.logit_bias.requires_grad
    group = next(g for g in trainer.optimizer.param_groups if "logit_bias" in g["names"])
    assert group["kind"] == "clip" and group["weight_decay"] == 0.0
    assert "logit_scale" in group["names"]
    with torch.no_grad():
        model.logit_bias.fill_(-12.5)
    model.save_pretrained(tmp_path / "saved")
    loaded = stanvid.load_model(tmp_path / "saved")
    assert float(loaded.logit_bias.detach()) == -12.5
    Trainer(loaded, _recipe(8, 1), steps_per_epoch=2, device="cpu")
    assert float(loaded.logit_bias.detach()) == -12.5  # the checkpoint's bias is where training starts
    Trainer(loaded, _recipe(8, 1, loss="infonce"), steps_per_epoch=2, device="cpu")
    assert not loaded.logit_bias.requires_grad


def test_the_recipe_key_is_validated():
    with pytest.raises(
        ConfigError, match="train.loss: 'siglip' is not a valid choice; valid choices: infonce, sigmoid"
    ):
        _recipe(8, 1, loss="siglip")
    with pytest.raises(ConfigError, match="train.loss: sigmoid is not available with the Mug head"):
        recipe(model={"similarity": "mug"}, train={"loss": "sigmoid"})
    with pytest.raises(ConfigError, match="train.loss: sigmoid is a retrieval loss"):
        recipe("recognition", train={"loss": "sigmoid"})
    assert recipe().train.loss == "infonce"

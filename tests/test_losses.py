"""Losses: InfoNCE against a hand-written reference, and 2 gloo ranks against 1 process with the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stanvid.distributed import leave_process_group
from stanvid.training.losses import (
    all_gather_with_grad,
    contrastive_loss,
    recognition_loss,
    text_classifier_logits,
)


def _reference_infonce(video: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """The official NormSoftmaxLoss written out element by element in float64."""

    def unit(row: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    v = [unit(row) for row in video.double().tolist()]
    t = [unit(row) for row in text.double().tolist()]
    n = len(v)
    logits = [
        [scale * sum(a * b for a, b in zip(v[i], t[j], strict=True)) for j in range(n)] for i in range(n)
    ]
    v2t = -sum(logits[i][i] - math.log(sum(math.exp(x) for x in logits[i])) for i in range(n)) / n
    t2v = -sum(logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return v2t + t2v


def test_contrastive_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
    for scale in (1.0, 20.0, 100.0):
        got = contrastive_loss(video, text, scale)
        assert got.item() == pytest.approx(_reference_infonce(video, text, scale), rel=1e-5, abs=1e-5)


def test_contrastive_loss_tensor_scale_gets_gradient():
    g = torch.Generator().manual_seed(1)
    video, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = contrastive_loss(video, text, log_scale.exp())
    assert loss.item() == pytest.approx(_reference_infonce(video, text, 1 / 0.07), rel=1e-5)
    loss.backward()
    eps = 1e-3
    with torch.no_grad():
        up = contrastive_loss(video, text, (log_scale + eps).exp())
        down = contrastive_loss(video, text, (log_scale - eps).exp())
    assert log_scale.grad.item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-2)


def test_contrastive_loss_rejects_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="pair up"):
        contrastive_loss(x, torch.randn(2, 4), 100.0)
    with pytest.raises(ValueError, match="logit_scale"):
        contrastive_loss(x, x, -1.0)


def test_all_gather_is_identity_on_one_process():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


def test_recognition_loss_against_reference():
    g = torch.Generator().manual_seed(2)
    video, classes = torch.randn(5, 6, generator=g), torch.randn(4, 6, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2])
    logits = text_classifier_logits(video, classes, 100.0)
    cos = [
        [
            sum(a * b for a, b in zip(v, c, strict=True))
            / math.sqrt(sum(a * a for a in v) * sum(b * b for b in c))
            for c in classes.double().tolist()
        ]
        for v in video.double().tolist()
    ]
    assert torch.allclose(logits.double(), 100 * torch.tensor(cos, dtype=torch.float64), atol=1e-4)
    expected = -sum(
        100 * cos[i][y] - math.log(sum(math.exp(100 * x) for x in cos[i]))
        for i, y in enumerate(labels.tolist())
    ) / len(labels)
    assert recognition_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="labels must be in"):
        recognition_loss(logits, torch.tensor([0, 1, 2, 3, 4]))


# ---- two ranks (gloo) against one process ------------------------------------------------------------------

_SIZES = (4, 2)  # unequal local batches also exercise the padded gather
_DIM_IN, _DIM = 7, 5


def _problem():
    """Inputs of the global batch, and the initial weights of two linear 'encoders' and a log logit scale."""
    g = torch.Generator().manual_seed(123)
    n = sum(_SIZES)
    x_video, x_text = torch.randn(n, _DIM_IN, generator=g), torch.randn(n, _DIM_IN, generator=g)
    w_video, w_text = torch.randn(_DIM, _DIM_IN, generator=g), torch.randn(_DIM, _DIM_IN, generator=g)
    return x_video, x_text, w_video, w_text, torch.tensor(math.log(20.0))


def _step(x_video, x_text, w_video, w_text, log_scale):
    params = [
        w_video.clone().requires_grad_(),
        w_text.clone().requires_grad_(),
        log_scale.clone().requires_grad_(),
    ]
    loss = contrastive_loss(x_video @ params[0].T, x_text @ params[1].T, params[2].exp())
    loss.backward()
    return loss.detach(), [p.grad for p in params]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clean = False
    try:
        x_video, x_text, w_video, w_text, log_scale = _problem()
        start = sum(_SIZES[:rank])
        local = slice(start, start + _SIZES[rank])
        loss, grads = _step(x_video[local], x_text[local], w_video, w_text, log_scale)
        for grad in grads:  # what DDP does: average the parameter gradients over the ranks
            dist.all_reduce(grad)
            grad /= world
        torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
        clean = True
    finally:
        leave_process_group(clean)  # waits for the other rank after a clean run


def test_two_gloo_ranks_equal_one_process(tmp_path, free_port):
    world = len(_SIZES)
    mp.spawn(_worker, args=(world, free_port, str(tmp_path)), nprocs=world, join=True)
    loss, grads = _step(*_problem())
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], loss, atol=1e-6), (rank, got["loss"], loss)
        for name, g_dist, g_one in zip(("w_video", "w_text", "log_scale"), got["grads"], grads, strict=True):
            assert torch.allclose(g_dist, g_one, atol=1e-6), (rank, name, g_dist, g_one)


def test_loss_is_float32_under_autocast():
    g = torch.Generator().manual_seed(5)
    video, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    expected = contrastive_loss(video, text, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(video, text, 100.0)
        logits = text_classifier_logits(video, text, 100.0)
    assert got.dtype == torch.float32 and logits.dtype == torch.float32
    assert torch.equal(got, expected)

"""Mug-STAN in training and evaluation: the loss of a training step against a hand-written reference, 2 gloo
ranks against 1 process, and evaluation from the head's scores against the all-at-once computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mugkit import mug_reference
from stanvid.distributed import leave_process_group
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.checkpoint import latest_checkpoint, load_checkpoint
from stanvid.training.evaluate import evaluate_retrieval, mug_scores
from stanvid.training.loop import fit
from stanvid.training.metrics import retrieval_metrics
from stanvid.training.trainer import Trainer
from testkit import tiny_config
from trainkit import FRAMES, SIZE, PaddedRetrieval, assert_close_runs, recipe

MODE = "mug_frame_token_simple"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def mug_model(seed: int = 0, mode: str = MODE) -> VideoCLIP:
    torch.manual_seed(seed)
    cfg = tiny_config(frames=FRAMES, image=SIZE, stan={"drop_path": 0.0}, similarity="mug", mug_mode=mode)
    return VideoCLIP(cfg)


def _mug_recipe(batch_size: int, **train):
    return recipe(
        model={"similarity": "mug", "mug_mode": MODE},
        train={"epochs": 1, "batch_size": batch_size, **train},
        optim={"lr": 1e-4, "warmup_epochs": 0.0, "eps": 1e-3},
    )


@pytest.mark.parametrize("mode", ["mug_frame_token_simple", "mug_frame_token"])
def test_training_step_loss_matches_hand_written_reference(mode):
    data = PaddedRetrieval(4)
    batch = {"video": data.videos, "tokens": data.tokens}
    model = mug_model(mode=mode)
    trainer = Trainer(model, _mug_recipe(4, temperature=0.02), steps_per_epoch=1, device="cpu")
    loss = trainer.loss(batch)
    # by hand: per-frame video and per-token text features, the official head, NormSoftmaxLoss at 1 / 0.02
    frames = model.encode_video(data.videos, pool=False)  # (B, T, D)
    tokens = model.encode_text(data.tokens, pool=False)  # (B, L, D)
    x = mug_reference(tokens, data.tokens != 0, frames, 100.0, mode) / 0.02  # (texts, videos)
    expected = -torch.diag(F.log_softmax(x, 1)).mean() - torch.diag(F.log_softmax(x.t(), 1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        # two forward passes round differently; the head's softmaxes at tau 100 amplify that a little
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-12)


def _runs(batch_size: int, out: Path) -> dict:
    model = mug_model(3)
    result = fit(model, PaddedRetrieval(8), _mug_recipe(batch_size), out_dir=out, progress=False)
    metrics = evaluate_retrieval(model, PaddedRetrieval(5, seed=9), batch_size=2, chunk_size=2)
    return {"history": result.history, "metrics": metrics}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clean = False
    try:
        torch.save(_runs(2, Path(out) / "ddp"), f"{out}/rank{rank}.pt")
        clean = True
    finally:
        leave_process_group(clean)  # waits for the other rank after a clean run


def test_two_gloo_ranks_train_the_mug_head_like_one_process(tmp_path, free_port):
    mp.spawn(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    single = _runs(4, tmp_path / "one")
    assert_close_runs(
        load_checkpoint(latest_checkpoint(tmp_path / "ddp")),
        load_checkpoint(latest_checkpoint(tmp_path / "one")),
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(got["history"], single["history"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        for direction in ("t2v", "v2t"):
            assert got["metrics"][direction] == pytest.approx(single["metrics"][direction])


@pytest.mark.parametrize("mode", ["mug_frame_token_simple", "mug_frame_text"])
def test_evaluation_ranks_the_head_scores_chunked_as_all_at_once(mode):
    model = mug_model(mode=mode).eval()
    data = PaddedRetrieval(7, seed=4)
    with torch.no_grad():
        frames = model.encode_video(data.videos, pool=False)
        tokens = model.encode_text(data.tokens, pool=False)
    full = mug_reference(tokens, data.tokens != 0, frames, 100.0, mode)  # (7, 7) all at once
    for chunk in (1, 2, 3, None):
        torch.testing.assert_close(mug_scores(model, tokens, data.tokens != 0, frames, chunk=chunk), full)
    metrics = evaluate_retrieval(model, data, batch_size=3, chunk_size=2, mug_chunk=2, dsl_temperature=0.05)
    assert metrics["t2v"] == pytest.approx(retrieval_metrics(full)["t2v"])
    assert metrics["v2t"] == pytest.approx(retrieval_metrics(full)["v2t"])
    assert metrics["dsl"]["t2v"] == pytest.approx(retrieval_metrics(full, dsl_temperature=0.05)["t2v"])

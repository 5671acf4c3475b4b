"""Mixed precision in training on the CPU: fp16 through the loss scaler (overflows skip steps, lower the scale,
and a resumed run repeats the uninterrupted one bit for bit), bf16 autocast, and a non-finite loss in fp32 or
bf16 stopping the run with the step and the batch's files named and the last checkpoint intact."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch

import stanvid.training.trainer as trainer_module
from stanvid.data import RetrievalDataset
from stanvid.data.retrieval_formats import load_video_captions
from stanvid.errors import ConfigError, NonFiniteLossError
from stanvid.precision import cpu_has_native_bf16
from stanvid.training.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint
from stanvid.training.loop import fit
from stanvid.training.trainer import Trainer, effective_precision, precision_note, setup_distributed
from trainkit import PaddedRetrieval, recipe, train_model
from videogen import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """bf16 training on this CPU: native where it is (this project's machines), otherwise emulated (the same
    numbers, slower), so the path runs on every CPU."""
    if not cpu_has_native_bf16():
        monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: True)


def _state(path: Path) -> dict:
    return load_checkpoint(path)


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["trainer"]["optimizer"]["state"], b["trainer"]["optimizer"]["state"]
    for index in opt_b:
        for name, value in opt_b[index].items():
            assert torch.equal(opt_a[index][name], value), (index, name)
    assert a["trainer"]["scaler"] == b["trainer"]["scaler"]
    assert a["trainer"]["skipped_steps"] == b["trainer"]["skipped_steps"]


# ---- fp16 and the loss scaler --------------------------------------------------------------------------------


def _fp16_recipe(max_steps: int | None = None):
    return recipe(
        train={
            "epochs": 3,
            "batch_size": 4,
            "precision": "fp16",
            "temperature": "learnable",
            "checkpoint_every": 1,
            "keep_checkpoints": 10,
            "max_steps": max_steps,
        },
        optim={"lr": 1e-3, "warmup_epochs": 0.0, "accumulation_steps": 2},
    )


def _log(out: Path) -> list[dict]:
    return [
        json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss_scale"' in line
    ]


def test_fp16_on_the_cpu_skips_overflowing_steps_lowers_the_scale_and_resumes_bit_identically(tmp_path):
    """The scaler starts at 2^16, where this model's fp16 gradients overflow: those steps are skipped (the
    weights stay), the scale halves each time, then training proceeds. Stopped after step 2 and resumed, the
    run ends bit-identical to the uninterrupted one: weights, AdamW moments, scaler state, skipped count."""
    data = PaddedRetrieval(16)
    model = train_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    full = fit(model, data, _fp16_recipe(), out_dir=tmp_path / "full", progress=False)
    log = _log(tmp_path / "full")
    assert full.steps == 6 and len(log) == 6
    first_skip = log[0]
    assert first_skip["skipped_steps"] == 1 and first_skip["loss_scale"] == 2.0**15
    assert first_skip["grad_norm"] is None  # non-finite: null in the JSON log
    after_first = _state(checkpoint_dir(tmp_path / "full") / "step-00000001.pt")
    for key, value in start.items():
        if key != "logit_scale":  # (clamped after every step, skipped or not)
            assert torch.equal(after_first["model"][key], value), key  # a skipped step changes nothing
    skipped = log[-1]["skipped_steps"]
    assert 1 <= skipped < 6 and log[-1]["loss_scale"] == 2.0 ** (16 - skipped)
    assert not torch.equal(model.visual.proj.weight, start["visual.proj.weight"])  # later steps trained
    final = _state(full.checkpoint)
    assert final["trainer"]["scaler"]["scale"] == log[-1]["loss_scale"]
    assert final["trainer"]["skipped_steps"] == skipped
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights

    stopped = fit(train_model(), data, _fp16_recipe(max_steps=2), out_dir=tmp_path / "run", progress=False)
    assert stopped.steps == 2
    resumed = fit(
        train_model(seed=9), data, _fp16_recipe(), out_dir=tmp_path / "run", resume=True, progress=False
    )
    _assert_bit_identical(_state(resumed.checkpoint), final)

    def timeless(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "videos_per_s"} for r in records]

    assert timeless(_log(tmp_path / "run")) == timeless(log)


# ---- bf16 ----------------------------------------------------------------------------------------------------


def test_bf16_on_the_cpu_trains_under_autocast_and_its_loss_goes_down(bf16_cpu):
    """bf16 autocast on the CPU (the embeddings come out bf16, the weights stay fp32), its losses going down
    with the fp32 run's, step for step within bf16's rounding."""
    data = PaddedRetrieval(8)
    runs = {}
    for precision in ("bf16", "fp32"):
        r = recipe(
            train={"epochs": 8, "batch_size": 4, "precision": precision, "temperature": "learnable"},
            optim={"lr": 1e-3, "warmup_epochs": 0.0, "accumulation_steps": 2},
        )
        model = train_model(stan={"drop_path": 0.0})
        result = fit(model, data, r, progress=False)
        runs[precision] = [h["loss"] for h in result.history]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    bf16, fp32 = runs["bf16"], runs["fp32"]
    print("bf16 losses", [round(x, 3) for x in bf16], "\nfp32 losses", [round(x, 3) for x in fp32])
    assert len(bf16) == 8 and bf16[-1] < 0.7 * bf16[0]
    assert bf16 == pytest.approx(fp32, rel=0.05)
    trainer = Trainer(train_model(), recipe(train={"precision": "bf16"}), steps_per_epoch=1, device="cpu")
    assert trainer.precision == "bf16"
    video_emb, text_emb, *_ = trainer._forward(trainer.forward_module, data.videos[:2], data.tokens[:2])
    assert video_emb.dtype == text_emb.dtype == torch.bfloat16


def test_precision_per_device_and_what_the_run_is_told(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: False)
    assert effective_precision("bf16", cpu) == "fp32"
    assert "no native bf16" in precision_note("bf16", cpu) and "training in fp32" in precision_note(
        "bf16", cpu
    )
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: True)
    assert effective_precision("bf16", cpu) == "bf16" and precision_note("bf16", cpu) is None
    assert effective_precision("fp16", cpu) == "fp16"  # the loss scaler on the CPU, as on CUDA
    monkeypatch.setattr(trainer_module, "cpu_has_native_fp16", lambda: False)
    assert "emulated" in precision_note("fp16", cpu) and "bf16 (native here) or fp32" in precision_note(
        "fp16", cpu
    )
    assert effective_precision("fp16", torch.device("meta")) == "fp32"
    assert precision_note("fp32", cpu) is None


def test_the_process_group_timeout_is_the_recipes(monkeypatch):
    """`train.dist_timeout_minutes` reaches ``init_process_group`` when `fit` starts the group itself."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        trainer_module.dist, "init_process_group", lambda backend, **kw: seen.update(kw, b=backend)
    )
    setup_distributed(recipe(train={"dist_timeout_minutes": 7.5}).train.dist_timeout_minutes)
    assert seen == {"timeout": datetime.timedelta(minutes=7.5), "b": "gloo"}


# ---- a non-finite loss ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("amp-captions")
    (root / "videos").mkdir()
    rows = ["video,caption"]
    for i in range(4):
        write_video(root / "videos" / f"v{i}.mp4", make_frames(8, 32, 32, seed=i), fps=8, gop=4)
        rows += [f"v{i}.mp4,a clip number {i}", f"v{i}.mp4,another caption of video {i}"]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def _caption_set(root: Path, poison_read: int | None = None) -> tuple[RetrievalDataset, list[str]]:
    """The 8 captions of 4 real videos; the ``poison_read``-th clip read decodes to NaN (a broken sample)."""
    r = _nan_recipe("fp32", 1)
    dataset = RetrievalDataset(
        load_video_captions(root / "train.csv", root / "videos"),
        num_frames=r.data.num_frames,
        train=True,
        image_size=r.data.input_size,
        context_length=r.data.text_length,
    )
    poisoned: list[str] = []
    if poison_read is not None:
        read, count = dataset._item, [0]

        def item(index, rng):
            out = read(index, rng)
            count[0] += 1
            if count[0] == poison_read:
                out["video"] = torch.full_like(out["video"], float("nan"))
                poisoned.append(out["path"])
            return out

        dataset._item = item
    return dataset, poisoned


def _nan_recipe(precision: str, accumulation: int, max_steps: int | None = None):
    train = {
        "epochs": 1,
        "batch_size": 2,
        "precision": precision,
        "checkpoint_every": 1,
        "max_steps": max_steps,
    }
    return recipe(train=train, optim={"accumulation_steps": accumulation})


@pytest.mark.parametrize(
    "precision, accumulation, step, batches",
    [("fp32", 1, 3, "batch 3"), ("bf16", 2, 2, "batches 3-4")],  # exact accumulation: both micro-batches
)
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_videos(
    tmp_path, caption_videos, precision, accumulation, step, batches, bf16_cpu
):
    """Read 5 (batch 3's first video) decodes to NaN: the run stops at that step naming the step's files,
    with the previous step's checkpoint the newest, readable, and equal to an uninterrupted run's."""
    data, poisoned = _caption_set(caption_videos, poison_read=5)
    with pytest.raises(NonFiniteLossError) as caught:
        fit(
            train_model(),
            data,
            _nan_recipe(precision, accumulation),
            out_dir=tmp_path / "bad",
            progress=False,
        )
    message = str(caught.value)
    print(message)
    last = latest_checkpoint(tmp_path / "bad")
    assert message.startswith(f"step {step} (epoch 1, {batches} of 4): the training loss is nan")
    assert f"train.precision {precision}" in message and poisoned[0] in message
    assert message.count("/videos/v") == 2 * accumulation  # every file of the step
    assert f"the last good checkpoint, {last}, is intact" in message
    assert last.name == f"step-{step - 1:08d}.pt"
    clean, _ = _caption_set(caption_videos)
    good = fit(
        train_model(),
        clean,
        _nan_recipe(precision, accumulation, max_steps=step - 1),
        out_dir=tmp_path / "good",
        progress=False,
    )
    _assert_bit_identical(_state(last), _state(good.checkpoint))


def test_the_demo_precision_reaches_its_transfer_runs():
    from stanvid.demo.run import DemoConfig

    assert DemoConfig.create(quick=True).transfer.precision == "fp32"
    assert DemoConfig.create(quick=True, precision="bf16").transfer.precision == "bf16"
    with pytest.raises(ConfigError, match="demo precision must be one of fp32, bf16"):
        DemoConfig.create(precision="fp16")

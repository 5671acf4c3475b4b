"""The training loop against second paths: 2 gloo ranks vs 1 process, resumed vs uninterrupted, torch's own
schedulers, the text classifier vs the linear head it initialises."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from stanvid.data import RetrievalDataset
from stanvid.data.retrieval_formats import load_video_captions
from stanvid.distributed import leave_process_group
from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.heads import LinearHead, encode_class_names
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.checkpoint import latest_checkpoint, load_checkpoint
from stanvid.training.evaluate import evaluate_retrieval
from stanvid.training.loop import HEAD_FILE, fit
from stanvid.training.losses import text_classifier_logits
from stanvid.training.recipe import OptimRecipe, Recipe
from stanvid.training.trainer import LRSchedule, param_groups
from trainkit import CONTEXT, FRAMES, SIZE, MemoryRetrieval, assert_close_runs, recipe, train_model
from videogen import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


class MemoryRecognition(torch.utils.data.Dataset):
    def __init__(self, n: int, classes: int, seed: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.videos = torch.randn(n, FRAMES, 3, SIZE, SIZE, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.videos[i], "label": int(self.labels[i])}


# ---- optimizer groups and schedule ---------------------------------------------------------------------------


def test_param_groups_follow_the_no_decay_rules():
    model = train_model()
    model.logit_scale.requires_grad_(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def decay_of(rule: str) -> tuple[dict[str, bool], dict[str, float]]:
        groups = param_groups(
            model, OptimRecipe(no_decay=rule, lr=1e-3, new_param_lr_mult=10.0, weight_decay=0.2)
        )
        names = [n for g in groups for n in g["names"]]
        assert sorted(names) == sorted(trainable)  # every trainable parameter exactly once
        decay = {n: g["weight_decay"] > 0 for g in groups for n in g["names"]}
        lr = {n: g["lr"] for g in groups for n in g["names"]}
        return decay, lr

    decay, lr = decay_of("clip_norm_bias")
    assert lr["visual.proj.weight"] == 1e-3 and lr["temporal.layers.0.temporal.fc.weight"] == pytest.approx(
        1e-2
    )
    assert (
        decay["visual.blocks.0.attn.qkv.weight"]
        and decay["visual.pos_embed"]
        and decay["text.token_embed.weight"]
    )
    assert not decay["visual.ln_pre.weight"] and not decay["visual.blocks.0.ln_1.bias"]
    assert not decay["visual.blocks.0.mlp.fc1.bias"] and not decay["logit_scale"]
    # the official mmengine behaviour: STAN's own norms and biases are decayed
    assert decay["temporal.layers.0.spatial.ln_1.weight"] and decay["temporal.layers.0.temporal.fc.bias"]

    decay, _ = decay_of("norm_bias")
    assert (
        not decay["temporal.layers.0.spatial.ln_1.weight"] and not decay["temporal.layers.0.temporal.fc.bias"]
    )
    assert decay["temporal.time_embed"] and not decay["visual.ln_post.bias"]

    decay, _ = decay_of("none")
    assert (
        decay["visual.ln_pre.weight"]
        and decay["temporal.layers.0.spatial.ln_1.bias"]
        and not decay["logit_scale"]
    )


def test_a_run_comparison_names_the_parameter_whose_adam_moments_differ():
    """`assert_close_runs` says which parameter's optimizer state differs: the state index alone (76) does not
    tell a flaky comparison's noise-dominated parameter from a real mismatch."""
    model = train_model(seed=0)
    optimizer = torch.optim.AdamW(param_groups(model, recipe().optim))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    one = {
        "step": 2,
        "model": model.state_dict(),
        "trainer": {"head": None, "optimizer": optimizer.state_dict()},
    }
    other = copy.deepcopy(one)
    other["trainer"]["optimizer"]["state"][3]["exp_avg"] += 1.0
    names = [n for g in optimizer.param_groups for n in g["names"]]
    with pytest.raises(AssertionError, match=rf"optimizer state 3 \({re.escape(names[3])}\) exp_avg"):
        assert_close_runs(other, one)


@pytest.mark.parametrize(
    "warmup, cosine, min_ratio, epochs",
    [(10.0, 4.5, 0.0, 10), (2.0, None, 0.1, 6), (2.0, 1.0, 0.0, 6), (0.0, None, 0.0, 3)],
)
def test_lr_schedule_matches_torch_linear_then_cosine(warmup, cosine, min_ratio, epochs):
    """Second path: torch's LinearLR then CosineAnnealingLR (mmengine's schedulers compute the same)."""
    steps_per_epoch, base = 4, 2e-6
    optim = OptimRecipe(lr=base, warmup_epochs=warmup, cosine_epochs=cosine, min_lr_ratio=min_ratio)
    schedule = LRSchedule.from_recipe(optim, epochs, steps_per_epoch)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    warm = round(warmup * steps_per_epoch)
    period = round((cosine if cosine is not None else epochs - warmup) * steps_per_epoch)
    stages, milestones = [], []
    if warm:
        stages.append(torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=warm))
        milestones.append(warm)
    if period:
        stages.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=period, eta_min=base * min_ratio))
    else:
        stages.append(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    reference = (
        torch.optim.lr_scheduler.SequentialLR(opt, stages, milestones) if len(stages) > 1 else stages[0]
    )
    for step in range(epochs * steps_per_epoch):
        assert base * schedule(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        reference.step()


# ---- recognition classifiers ---------------------------------------------------------------------------------


def test_linear_head_starts_as_the_text_classifier():
    model = train_model().eval()
    classes = encode_class_names(model, ["jumping", "running", "cooking soup"], CONTEXT)
    video = model.encode_video(torch.randn(5, FRAMES, 3, SIZE, SIZE))
    head = LinearHead.from_class_features(classes, 50.0)
    torch.testing.assert_close(
        head(video), text_classifier_logits(video, classes, 50.0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("classifier", ["text", "linear"])
def test_recognition_training_keeps_the_text_tower_frozen(tmp_path, classifier):
    names = NAMES
    model = train_model()
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    visual_before = model.visual.proj.weight.clone()
    r = recipe(
        "recognition",
        model={"classifier": classifier},
        train={"epochs": 1},
        optim={"warmup_epochs": 0.0, "lr": 1e-3},
    )
    result = fit(
        model, MemoryRecognition(8, len(names)), r, out_dir=tmp_path, progress=False, class_names=names
    )
    assert result.steps == 2 and all(math.isfinite(h["loss"]) for h in result.history if "loss" in h)
    for key, value in model.text.state_dict().items():
        assert torch.equal(value, text_before[key]), key
    assert not torch.equal(model.visual.proj.weight, visual_before)
    assert (tmp_path / "model" / HEAD_FILE).is_file() == (classifier == "linear")
    if classifier == "linear":
        saved = load_checkpoint(result.checkpoint)["trainer"]["head"]
        for key, value in load_file(str(tmp_path / "model" / HEAD_FILE)).items():
            assert torch.equal(value, saved[key])


# ---- distributed: 2 gloo ranks == 1 process with the whole batch ---------------------------------------------


NAMES = ["jumping", "running", "cooking soup"]


def _ddp_recipe(batch_size: int, task: str = "retrieval") -> Recipe:
    # eps 1e-3: AdamW's update of a parameter whose gradient is rounding noise (CLIP's key biases get none)
    # stays of that noise's size instead of being normalized up to a full step of random sign
    return recipe(
        task,
        model={"classifier": "linear"},
        train={"epochs": 1, "batch_size": batch_size, "temperature": "learnable"},
        optim={"lr": 1e-4, "warmup_epochs": 0.0, "eps": 1e-3},
    )


def _ddp_model() -> VideoCLIP:
    return train_model(seed=3, stan={"drop_path": 0.0})  # no random drop-path: ranks would draw differently


def _ddp_runs(batch_size: int, out: Path, device: str = "cpu") -> dict:
    """Retrieval (learned temperature) and recognition (linear head) runs of 2 steps, then an evaluation."""
    model = _ddp_model()
    retrieval = fit(
        model,
        MemoryRetrieval(8),
        _ddp_recipe(batch_size),
        out_dir=out / "retrieval",
        progress=False,
        device=device,
    )
    metrics = evaluate_retrieval(model, MemoryRetrieval(5, seed=9), batch_size=2, chunk_size=2)
    recognition = fit(
        _ddp_model(),
        MemoryRecognition(8, len(NAMES)),
        _ddp_recipe(batch_size, "recognition"),
        out_dir=out / "recognition",
        progress=False,
        class_names=NAMES,
        device=device,
    )
    return {"retrieval": retrieval.history, "recognition": recognition.history, "metrics": metrics}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clean = False
    try:
        torch.save(_ddp_runs(2, Path(out) / "ddp"), f"{out}/rank{rank}.pt")
        clean = True
    finally:
        leave_process_group(clean)  # waits for the other rank after a clean run


def test_two_gloo_ranks_train_and_evaluate_like_one_process(tmp_path, free_port):
    mp.spawn(_ddp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    single = _ddp_runs(4, tmp_path / "one")
    for task in ("retrieval", "recognition"):
        assert_close_runs(
            load_checkpoint(latest_checkpoint(tmp_path / "ddp" / task)),
            load_checkpoint(latest_checkpoint(tmp_path / "one" / task)),
        )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for task in ("retrieval", "recognition"):
            for a, b in zip(got[task], single[task], strict=True):
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # the gradient's scale
                assert a["logit_scale"] == pytest.approx(b["logit_scale"], rel=1e-6)
        for direction in ("t2v", "v2t"):
            assert got["metrics"][direction] == pytest.approx(single["metrics"][direction])


# ---- resume == uninterrupted ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory) -> Path:
    """4 generated videos with 2 captions each, as a csv of (video, caption)."""
    root = tmp_path_factory.mktemp("captions")
    (root / "videos").mkdir()
    rows = ["video,caption"]
    for i in range(4):
        write_video(root / "videos" / f"v{i}.mp4", make_frames(10, 32, 32, seed=i), fps=10, gop=5)
        rows += [f"v{i}.mp4,a clip number {i}", f"v{i}.mp4,another caption of video {i}"]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def _caption_set(root: Path) -> RetrievalDataset:
    ann = load_video_captions(root / "train.csv", root / "videos")
    from stanvid.training.runs import build_dataset

    return build_dataset(_resume_recipe(0), "train", ann)


def _resume_recipe(workers: int, max_steps: int | None = None) -> Recipe:
    return recipe(
        train={
            "epochs": 3,
            "batch_size": 2,
            "temperature": "learnable",
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "max_steps": max_steps,
        },
        optim={"lr": 1e-4, "accumulation_steps": 2, "warmup_epochs": 1.0},
        data={"num_workers": workers},
    )


def crash_on_read(monkeypatch, dataset: RetrievalDataset, n: int) -> None:
    """Make the n-th clip read raise, like a machine going down in the middle of a step."""
    read = dataset._item
    count = [0]

    def item(index, rng):
        count[0] += 1
        if count[0] == n:
            raise RuntimeError("simulated crash")
        return read(index, rng)

    monkeypatch.setattr(dataset, "_item", item)


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["trainer"]["optimizer"], b["trainer"]["optimizer"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index in opt_a["state"]:
        for name, value in opt_a["state"][index].items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    assert a["trainer"]["scheduler"]["last_epoch"] == b["trainer"]["scheduler"]["last_epoch"]


def test_resume_after_a_crash_or_a_stop_equals_the_uninterrupted_run(tmp_path, caption_data, monkeypatch):
    """Real decoded videos with random frames and crops, drop-path, a learned temperature, accumulation over 2
    micro-batches: 6 optimizer steps over 3 epochs, then the same interrupted and resumed."""
    data = _caption_set(caption_data)
    full = fit(train_model(), data, _resume_recipe(0), out_dir=tmp_path / "full", progress=False)
    assert full.steps == 6 and full.epochs == 3
    reference = load_checkpoint(full.checkpoint)

    # crash while reading item 11: epoch 2, second micro-batch of its first step (gradients half accumulated)
    crashing = _caption_set(caption_data)
    crash_on_read(monkeypatch, crashing, 11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(train_model(), crashing, _resume_recipe(0), out_dir=tmp_path / "crash", progress=False)
    assert load_checkpoint(latest_checkpoint(tmp_path / "crash"))["step"] == 2
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        fit(train_model(), data, _resume_recipe(0), out_dir=tmp_path / "crash", progress=False)
    with pytest.raises(ConfigError, match="optim.lr"):
        changed = _resume_recipe(0)
        changed.optim.lr = 1e-3
        fit(train_model(), data, changed, out_dir=tmp_path / "crash", resume=True, progress=False)
    resumed = fit(
        train_model(seed=7), data, _resume_recipe(0), out_dir=tmp_path / "crash", resume=True, progress=False
    )
    _assert_same_run(load_checkpoint(resumed.checkpoint), reference)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert len(list((tmp_path / "crash" / "checkpoints").glob("*.pt"))) == 2  # keep_checkpoints

    # stop mid-epoch with max_steps, decoding in 2 worker processes; resume to the end
    stopped = fit(
        train_model(), data, _resume_recipe(2, max_steps=3), out_dir=tmp_path / "stop", progress=False
    )
    assert stopped.steps == 3 and stopped.epochs == 1
    resumed = fit(
        train_model(), data, _resume_recipe(2), out_dir=tmp_path / "stop", resume=True, progress=False
    )
    _assert_same_run(load_checkpoint(resumed.checkpoint), reference)
    logged = [line for line in (tmp_path / "stop" / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 6  # one line per step, none repeated by the resumption


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, caption_data, capsys):
    """The newest checkpoint cut short (a full disk, a copy interrupted): --resume says which one it skipped and
    why, continues from the previous one, and still reaches the uninterrupted run's weights bit for bit."""
    data = _caption_set(caption_data)
    full = fit(train_model(), data, _resume_recipe(0), out_dir=tmp_path / "full", progress=False)
    stopped = fit(
        train_model(), data, _resume_recipe(0, max_steps=3), out_dir=tmp_path / "run", progress=False
    )
    newest = latest_checkpoint(tmp_path / "run")
    assert stopped.steps == 3 and newest.name == "step-00000003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    resumed = fit(
        train_model(), data, _resume_recipe(0), out_dir=tmp_path / "run", resume=True, progress=False
    )
    err = capsys.readouterr().err
    assert f"skipping {newest}" in err and "not a readable stanvid training checkpoint" in err
    assert "continuing from step-00000002.pt" in err
    _assert_same_run(load_checkpoint(resumed.checkpoint), load_checkpoint(full.checkpoint))

    for path in (tmp_path / "run" / "checkpoints").glob("*.pt"):  # none reads: the error names the newest
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="step-00000006.pt"):
        fit(train_model(), data, _resume_recipe(0), out_dir=tmp_path / "run", resume=True, progress=False)


def test_the_epoch_seed_hook_makes_an_item_a_function_of_seed_epoch_and_index(caption_data):
    """`set_epoch_seed(seed, epoch)`: item i draws from ``default_rng([seed, epoch, i])`` whatever was read
    before it and in whichever dataset copy; another epoch draws differently; None restores the stream."""
    import numpy as np

    first, second = _caption_set(caption_data), _caption_set(caption_data)
    first.set_epoch_seed(5, 1)
    a = first[3]["video"]
    first[0], first[1]  # noqa: B018 (reads that a shared stream would advance)
    assert torch.equal(first[3]["video"], a)
    second.set_epoch_seed(5, 1)
    assert torch.equal(second[3]["video"], a)
    assert torch.equal(second._item(3, np.random.default_rng([5, 1, 3]))["video"], a)
    second.set_epoch_seed(5, 2)
    assert not torch.equal(second[3]["video"], a)
    second.set_epoch_seed(None)
    assert not torch.equal(second[3]["video"], second[3]["video"])  # one stream: each read draws anew
    with pytest.raises(ConfigError, match="set_epoch_seed"):
        second.set_epoch_seed(-1, 0)


class _TouchesOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resuming_from_a_hostile_checkpoint_runs_nothing_and_says_so_in_one_line(tmp_path):
    """`stanvid.training.checkpoint.load_checkpoint` (resume) and `runs.load_trained` (eval) share one reader."""
    evil, marker = tmp_path / "checkpoints" / "step-00000001.pt", tmp_path / "ran"
    evil.parent.mkdir()
    torch.save({"format": "stanvid-train-checkpoint", "model": _TouchesOnLoad(marker)}, evil)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(latest_checkpoint(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{evil}: not a readable stanvid training checkpoint") and "\n" not in message
    assert not marker.exists()

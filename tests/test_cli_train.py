"""`stanvid train` / `stanvid eval` end to end on generated videos, `--dry-run` of every shipped recipe, and
one-line errors for bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stanvid.checkpoints.load import load_model
from stanvid.cli import main
from stanvid.models.config import CLIPConfig, ModelConfig, STANConfig, TextConfig, VisionConfig
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.recipe import load_recipe
from stanvid.training.runs import build_dataset, evaluate_model, load_trained
from testkit import stop_leaves_nothing
from videogen import make_frames, write_video

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def _tiny(image: int, patch: int, layers: int, context: int) -> VideoCLIP:
    torch.manual_seed(0)
    vision = VisionConfig(width=48, layers=layers, heads=3, patch_size=patch, image_size=image)
    text = TextConfig(width=32, layers=2, heads=2, context_length=context)
    cfg = ModelConfig(
        clip=CLIPConfig(embed_dim=24, vision=vision, text=text),
        temporal="stan",
        num_frames=4,
        stan=STANConfig(depth=2),
    )
    return VideoCLIP(cfg)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, make_frames(10, 32, 32, seed=3), fps=10, gop=5)
    return path


# ---- end to end ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("csv_data")
    (root / "videos").mkdir()
    train, test = ["video,caption"], ["video,caption"]
    for i in range(4):
        write_video(root / "videos" / f"v{i}.mp4", make_frames(10, 32, 32, seed=20 + i), fps=10, gop=5)
        train += [f"v{i}.mp4,a generated clip {i}", f"v{i}.mp4,moving texture number {i}"]
        test += [f"v{i}.mp4,what is clip {i}"]
    (root / "train.csv").write_text("\n".join(train) + "\n")
    (root / "test.csv").write_text("\n".join(test) + "\n")
    model_dir = root / "tiny_model"
    _tiny(image=24, patch=8, layers=3, context=16).save_pretrained(model_dir)
    recipe = {
        "name": "tiny_csv",
        "task": "retrieval",
        "model": {"source": str(model_dir), "temporal": "stan", "stan_depth": 2, "num_frames": 4},
        "data": {
            "dataset": "csv",
            "root": str(root),
            "train_annotations": "train.csv",
            "test_annotations": "test.csv",
            "num_frames": 4,
            "input_size": 24,
            "train_resize": 28,
            "test_resize": 24,
            "text_length": 16,
            "num_workers": 0,
        },
        "optim": {"lr": 1e-4, "warmup_epochs": 1.0},
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "precision": "fp32",
            "temperature": 0.05,
            "log_every": 1,
            "checkpoint_every": 3,
            "eval_every": 1,
            "output_dir": str(root / "default_out"),
        },
        "eval": {"batch_size": 2, "chunk_size": 2},
    }
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe))
    return {"root": root, "config": config}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list child processes")
def test_sigterm_to_stanvid_train_ends_its_loader_workers(csv_run, tmp_path):
    """`stanvid train` with 2 decoding workers, stopped by SIGTERM mid-run: the command exits 143 (as from the
    signal) and neither the workers nor their forkserver outlive it."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    argv = [
        sys.executable,
        "-m",
        "stanvid.cli",
        "train",
        str(csv_run["config"]),
        "--out",
        str(tmp_path / "run"),
    ]
    argv += ["--no-progress", "--set", "train.epochs=1000", "--set", "data.num_workers=2"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        code = stop_leaves_nothing(proc, signal.SIGTERM, children=3)  # the forkserver and two workers
        assert code == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_train_then_eval_through_the_cli(csv_run, tmp_path, capsys):
    config = str(csv_run["config"])
    out = tmp_path / "run"
    assert main(["train", config, "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 8 captions / batch 2 = 4 steps x 2 epochs
    assert [r["epoch"] for r in evals] == [1, 2]
    assert load_recipe(out / "recipe.yaml").train.output_dir == str(out)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "step-00000006.pt",
        "step-00000008.pt",
    ]

    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                config,
                "--checkpoint",
                str(out / "model"),
                "--baseline",
                "--out",
                str(tmp_path / "ev"),
                "--no-progress",
                "--precision",
                "fp32",  # compared with the float32 library path below
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(report["metrics"]) == {"stan (model)", "zero-shot CLIP (meanP)"}
    assert report["num_videos"] == 4 and report["num_texts"] == 4
    assert "stan (model)/dsl/t2v" in printed and "zero-shot CLIP (meanP)/v2t" in printed

    # second path: the library on the reloaded weights, and the evaluation logged at the end of training
    recipe = load_recipe(config)
    expected = evaluate_model(load_model(out / "model"), build_dataset(recipe, "test"), recipe)
    got = report["metrics"]["stan (model)"]
    for direction in ("t2v", "v2t"):
        assert got[direction] == pytest.approx(expected[direction])
        assert got["dsl"][direction] == pytest.approx(expected["dsl"][direction])
        assert evals[-1]["eval"][direction] == pytest.approx(expected[direction])

    # the training checkpoint evaluates to the same numbers as the saved model
    assert (
        main(
            [
                "eval",
                config,
                "--checkpoint",
                str(out / "checkpoints" / "step-00000008.pt"),
                "--out",
                str(tmp_path / "ev2"),
                "--no-progress",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    from_checkpoint = json.loads((tmp_path / "ev2" / "eval.json").read_text())["metrics"]
    assert list(from_checkpoint.values())[0]["t2v"] == pytest.approx(expected["t2v"])


def test_recognition_with_a_linear_head_through_the_cli(csv_run, tmp_path):
    """Train a linear head (it is saved beside the model) and evaluate over 2 clips x 3 crops."""
    root = csv_run["root"]
    (root / "classes.txt").write_text("waving\nclapping\n")
    (root / "labels.txt").write_text("".join(f"v{i}.mp4 {i % 2}\n" for i in range(4)))
    recipe = yaml.safe_load(csv_run["config"].read_text())
    recipe["task"] = "recognition"
    recipe["model"]["classifier"] = "linear"
    recipe["data"].update(
        train_annotations="labels.txt", test_annotations="labels.txt", class_names="classes.txt"
    )
    recipe["train"].update(epochs=1, temperature="learnable")
    recipe["eval"].update(num_clips=2, num_crops=3)
    config = tmp_path / "recognition.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress"]) == 0
    assert (out / "model" / "head.safetensors").is_file()
    assert (
        main(
            [
                "eval",
                str(config),
                "--checkpoint",
                str(out / "model"),
                "--out",
                str(out),
                "--no-progress",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    got = json.loads((out / "eval.json").read_text())["metrics"]["stan (model)"]

    loaded = load_recipe(config)
    model, head = load_trained(out / "model", loaded)
    assert head is not None
    expected = evaluate_model(model, build_dataset(loaded, "test"), loaded, head=head)
    assert got == pytest.approx(expected)
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["eval"] == pytest.approx(expected)  # the evaluation at the end of training, same numbers


# ---- --dry-run of every shipped recipe -----------------------------------------------------------------------


def _write_dataset(recipe, root: Path, clip: Path) -> None:
    """The annotation files and video folders ``recipe`` names, 20 videos (batch sizes go to 16), under ``root``."""
    d = recipe.data
    names = [f"video{i}" for i in range(20)]

    def videos(folder: str, stems: list[str]) -> None:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            shutil.copy(clip, root / folder / f"{stem}.mp4")

    for split, ann in (("train", d.train_annotations), ("test", d.test_annotations)):
        folder = d.video_dir if split == "train" or d.test_video_dir is None else d.test_video_dir
        path = root / ann
        if (
            d.dataset == "webdataset"
        ):  # shards of 2 samples (20 for the 16 readers of 16 workers), and their index
            from stanvid import load_video_captions, write_shards

            source = root / f"{split}-source"
            stems = [f"video{i}" for i in range(40 if split == "train" else 20)]
            videos(str(source.relative_to(root)), stems)
            (source / "c.csv").write_text("video,caption\n" + "".join(f"{n}.mp4,clip {n}\n" for n in stems))
            assert path.name.endswith("shards.json")
            prefix = path.name[: -len("shards.json")]
            write_shards(
                load_video_captions(source / "c.csv", source),
                source,
                path.parent,
                samples_per_shard=2,
                prefix=prefix,
            )
        elif (
            d.dataset == "webvid" and split == "train"
        ):  # the released WebVid CSV, videos in page_dir folders
            videos(f"{folder}/000001_000050", [str(1000 + i) for i in range(30)])  # batch 24
            rows = "".join(
                f'{1000 + i},"clip {i}, a caption",000001_000050,url,PT00H00M10S\n' for i in range(30)
            )
            path.write_text("videoid,name,page_dir,contentUrl,duration\n" + rows)
        elif d.dataset in ("msrvtt", "didemo", "lsmdc", "webvid"):  # json caption files
            videos(folder, names)
            path.write_text(json.dumps({f"{n}.mp4": [f"a caption of {n}", f"more about {n}"] for n in names}))
        elif d.dataset == "msvd":
            videos(folder, names)
            path.write_text("\n".join(names) + "\n")
            with open(root / d.captions, "wb") as f:
                pickle.dump({n: [["a", "man", "walks"], ["the", n]] for n in names}, f)
        elif d.dataset == "kinetics400":
            videos(folder, names)
            (root / d.class_names).write_text("abseiling\nair drumming\nanswering questions\n")
            path.write_text("".join(f"{n}.mp4 {i % 3}\n" for i, n in enumerate(names)))
        elif d.dataset == "ssv2":
            videos(folder, [str(i) for i in range(1, 21)])
            templates = [
                "Pushing [something] from left to right",
                "Holding [something]",
                "Opening [something]",
            ]
            (root / d.class_names).write_text(
                json.dumps({t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(templates)})
            )
            path.write_text(
                json.dumps(
                    [
                        {"id": str(i), "label": "x", "template": templates[i % 3], "placeholders": []}
                        for i in range(1, 21)
                    ]
                )
            )
        else:
            raise AssertionError(f"no generator for {d.dataset}")


@pytest.fixture(scope="module")
def dry_run_model(tmp_path_factory) -> Path:
    """Fits every recipe's data settings (image 224, 77 tokens, 6 layers for SSv2's depth 6) yet loads in ms."""
    path = tmp_path_factory.mktemp("dry_model") / "model"
    _tiny(image=224, patch=32, layers=6, context=77).save_pretrained(path)
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_passes_dry_run(config, dry_run_model, clip_file, tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    overrides = [f"data.root={root}", f"model.source={dry_run_model}", f"train.output_dir={out}"]
    recipe = load_recipe(config, overrides)
    _write_dataset(recipe, root, clip_file)
    args = ["train", str(config), "--dry-run"] + [x for item in overrides for x in ("--set", item)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    resolved, _, report = printed.partition("# dry run of")
    assert yaml.safe_load(resolved) == recipe.to_dict()
    assert "train " in report and "test " in report and "optimizer steps" in report
    assert not out.exists()  # nothing trained, nothing written


# ---- bad input: one line, exit code 2 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, argv, message",
    [
        ("unknown key", ["train", "{config}", "--dry-run", "--set", "optim.lrr=1e-5"], "did you mean 'lr'"),
        ("bad value", ["train", "{config}", "--dry-run", "--set", "optim.lr=-1"], "optim.lr must be > 0"),
        ("bad choice", ["train", "{config}", "--set", "train.precision=fp8"], "valid choices"),
        ("no config", ["train", "{missing}/none.yaml", "--dry-run"], "recipe file not found"),
        (
            "no annotations",
            ["train", "{config}", "--dry-run", "--set", "data.train_annotations=nope.csv"],
            "nope.csv does not exist",
        ),
        ("no videos", ["train", "{config}", "--dry-run", "--set", "data.video_dir=missing"], "missing"),
        (
            "no model",
            ["train", "{config}", "--dry-run", "--set", "model.source={missing}/model"],
            "no such file or directory",
        ),
        ("no checkpoint", ["eval", "{config}", "--checkpoint", "{missing}/ckpt.pt"], "ckpt.pt"),
        (
            "size mismatch",
            ["train", "{config}", "--dry-run", "--set", "data.input_size=32", "--set", "data.test_resize=32"],
            "does not match the model's image size 24",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_bad_input_is_one_line_and_exit_code_2(csv_run, tmp_path, capsys, case, argv, message):
    argv = [a.format(config=csv_run["config"], missing=tmp_path) for a in argv]
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err


class _RunsCode:
    """Unpickling this calls `Path.touch` on a marker: a checkpoint that would run code if loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["code", "truncated"])
def test_eval_of_a_hostile_checkpoint_is_one_line_and_runs_nothing(csv_run, tmp_path, capsys, kind):
    evil, marker = tmp_path / "evil.pt", tmp_path / "ran"
    if kind == "code":
        torch.save({"format": "stanvid-train", "model": _RunsCode(marker)}, evil)
    else:
        torch.save({"model": {"w": torch.zeros(1000)}}, evil)
        evil.write_bytes(evil.read_bytes()[:-200])
    code = main(
        ["eval", str(csv_run["config"]), "--checkpoint", str(evil), "--out", str(tmp_path), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(evil) in err
    assert not marker.exists()


def test_mugstan_train_then_eval_through_the_cli(csv_run, tmp_path, capsys):
    """`model.similarity: mug`: trained on the head's loss, saved with the head, evaluated on the head's scores
    (the table row names it), against the library's all-pairs evaluation of the saved model."""
    recipe = yaml.safe_load(csv_run["config"].read_text())
    recipe["model"].update(similarity="mug", mug_mode="mug_frame_token_simple", mug_tau=100.0)
    recipe["data"]["test_num_frames"] = 5
    recipe["train"].update(epochs=1)
    config = tmp_path / "mug.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress"]) == 0
    saved = load_model(out / "model")
    assert (saved.config.similarity, saved.config.mug_mode) == ("mug", "mug_frame_token_simple")
    capsys.readouterr()
    assert (
        main(
            ["eval", str(config), "--checkpoint", str(out / "model"), "--out", str(out)]
            + ["--no-progress", "--precision", "fp32"]
        )
        == 0
    )
    assert "Mug head" in capsys.readouterr().out
    got = json.loads((out / "eval.json").read_text())["metrics"]
    (row,) = got.values()
    loaded = load_recipe(config)
    dataset = build_dataset(loaded, "test")
    assert dataset[0]["video"].shape[0] == 5  # data.test_num_frames
    expected = evaluate_model(saved, dataset, loaded)
    for direction in ("t2v", "v2t"):
        assert row[direction] == pytest.approx(expected[direction])
        assert row["dsl"][direction] == pytest.approx(expected["dsl"][direction])


@pytest.mark.parametrize("test_resize", [24, 32])
def test_datasets_normalize_frames_as_the_model_was_trained(csv_run, test_resize):
    """A CLIP trained with other normalization values (open_clip's ViT-L-14 laion2b: mean = std = 0.5) gets its
    frames normalized with them in training and evaluation, not with OpenAI's constants."""
    from stanvid.models.config import PreprocessConfig
    from stanvid.video.transforms import CLIP_MEAN, CLIP_STD

    recipe = load_recipe(csv_run["config"], [f"data.test_resize={test_resize}"])
    half = PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for split in ("train", "test"):
        openai = build_dataset(recipe, split)[0]["video"]  # (T, 3, S, S), OpenAI's values
        custom = build_dataset(recipe, split, preprocess=half)[0]["video"]
        # the same pixels x in [0, 1] either way: x = v * std + mean
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        pixels = openai * std + mean
        torch.testing.assert_close(custom, (pixels - 0.5) / 0.5, atol=1e-5, rtol=0)
        assert (custom - openai).abs().max() > 0.1

"""`--set` on every command that has it: a value means what it says (`grad_checkpointing=false` is False, not
`bool("false")`), a bad one is one line naming the key and exit code 2; and a command whose optional
dependency is missing still parses its arguments and shows its help, and its run names the extra to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import stanvid
import stanvid.checkpoints.load
import stanvid.training.runs
from stanvid.cli import main
from stanvid.errors import ConfigError
from stanvid.models.config import ModelConfig
from testkit import tiny_config, tiny_model
from videogen import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES, SIZE = 4, 24
MODEL_COMMANDS = ("convert", "index", "embed")
RECIPE_COMMANDS = ("train", "eval")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny model saved with grad_checkpointing on (so an override to off is visible), two videos and a
    recipe over them that also turns it on."""
    root = tmp_path_factory.mktemp("overrides")
    model_dir = root / "model"
    tiny_model(frames=FRAMES, image=SIZE, grad_checkpointing=True).save_pretrained(model_dir)
    videos = root / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"v{i}.mp4", make_frames(8, 32, 32, seed=i), fps=8, gop=4)
    (root / "test.csv").write_text("video,caption\nv0.mp4,clip zero\nv1.mp4,clip one\n")
    recipe = {
        "name": "overrides",
        "task": "retrieval",
        "model": {
            "source": str(model_dir),
            "stan_depth": 2,
            "num_frames": FRAMES,
            "grad_checkpointing": True,
        },
        "data": {
            "dataset": "csv",
            "root": str(root),
            "train_annotations": "test.csv",
            "test_annotations": "test.csv",
            "num_frames": FRAMES,
            "input_size": SIZE,
            "train_resize": SIZE,
            "test_resize": SIZE,
            "text_length": 16,
            "num_workers": 0,
        },
        "train": {"output_dir": str(root / "run"), "batch_size": 2},
    }
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    return {"root": root, "model": model_dir, "videos": videos, "config": config}


def _model_argv(command: str, data: dict[str, Path], out: Path) -> list[str]:
    model, videos = str(data["model"]), str(data["videos"])
    common = ["--no-progress", "--workers", "0"]
    return {
        "convert": ["convert", model, str(out)],
        "index": ["index", videos, "--model", model, "--out", str(out), "--precision", "fp32", *common],
        "embed": ["embed", videos, "--model", model, "--out", str(out / "features.npy"), *common],
    }[command]


def _recorded_loads(monkeypatch) -> list[stanvid.VideoCLIP]:
    """Every model loaded from now on: `load_model` and `load_model_and_weights` (through which index and
    embed load, to cache the fingerprint) both build it in `stanvid.checkpoints.load._load`."""
    loaded, real = [], stanvid.checkpoints.load._load

    def _load(*args, **kwargs):
        model, weights = real(*args, **kwargs)
        loaded.append(model)
        return model, weights

    monkeypatch.setattr(stanvid.checkpoints.load, "_load", _load)
    return loaded


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("text, expected", [("false", False), ("true", True), ("0", False)])
def test_model_set_gives_the_typed_value(command, text, expected, data, tmp_path, monkeypatch):
    loaded = _recorded_loads(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    argv = _model_argv(command, data, out) + ["--set", f"grad_checkpointing={text}"]
    assert main(argv) == 0
    if command == "convert":  # what it built is the folder it wrote
        built = json.loads((out / "config.json").read_text())["grad_checkpointing"]
        assert stanvid.load_model(out).config.grad_checkpointing is expected
    else:
        built = loaded[-1].config.grad_checkpointing
    assert built is expected


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
def test_recipe_set_gives_the_typed_value(command, data, tmp_path, monkeypatch, capsys):
    built = []
    if command == "train":  # the dry run loads the model as a run would: record it
        real = stanvid.training.runs.load_run_model
        monkeypatch.setattr(
            stanvid.training.runs, "load_run_model", lambda recipe: built.append(real(recipe)) or built[-1]
        )
        argv = ["train", str(data["config"]), "--dry-run", "--out", str(tmp_path / "run")]
    else:  # eval: record the recipe it evaluates with (grad checkpointing does not reach an eval's model)
        monkeypatch.setattr(
            stanvid.training.runs, "evaluate_run", lambda recipe, *a, **k: built.append(recipe) or {}
        )
        argv = ["eval", str(data["config"])]
    assert main([*argv, "--set", "model.grad_checkpointing=false"]) == 0
    value = built[-1].config.grad_checkpointing if command == "train" else built[-1].model.grad_checkpointing
    assert value is False
    if command == "train":
        assert (
            yaml.safe_load(capsys.readouterr().out.partition("# dry run")[0])["model"]["grad_checkpointing"]
            is False
        )


def _assert_one_line(capsys, *words: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("item", ["num_frames=abc", "grad_checkpointing=maybe"])
def test_model_set_bad_value_is_one_line_naming_the_key(command, item, data, tmp_path, monkeypatch, capsys):
    loaded = _recorded_loads(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    assert main(_model_argv(command, data, out) + ["--set", item]) == 2
    _assert_one_line(capsys, item.partition("=")[0], repr(item.partition("=")[2]))
    assert loaded == [] and list(out.iterdir()) == []  # refused before anything was loaded or written


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
def test_recipe_set_bad_value_is_one_line_naming_the_key(command, data, tmp_path, capsys):
    argv = [command, str(data["config"]), "--set", "data.num_frames=abc", "--out", str(tmp_path / "o")]
    if command == "train":
        argv.append("--dry-run")
    assert main(argv) == 2
    _assert_one_line(capsys, "data.num_frames")
    assert not (tmp_path / "o").exists()


def test_every_model_or_recipe_set_is_one_definition():
    """The `--set` of every command comes from stanvid.cli.common: the same help, the same destination."""
    from stanvid.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    helps = {}
    for name, p in sub.items():
        for action in p._actions:
            if "--set" in action.option_strings:
                assert action.dest == "overrides" and action.metavar == "KEY=VALUE", name
                helps.setdefault("recipe" if "optim.lr" in action.help else "model", set()).add(action.help)
    assert {k: len(v) for k, v in helps.items()} == {"model": 1, "recipe": 1}
    assert {n for n, p in sub.items() if any("--set" in a.option_strings for a in p._actions)} == {
        *MODEL_COMMANDS,
        *RECIPE_COMMANDS,
        "export",  # the model --set too; its typed values are tested in test_export_onnx.py
    }


# ---------------------------------------------------------------------------------------- the same in Python
def test_load_model_reads_a_string_override_as_the_command_line_does(parity):
    source = parity("stan_tiny_a/hf_clip")
    assert stanvid.load_model(source, grad_checkpointing="false").config.grad_checkpointing is False
    assert stanvid.load_model(source, grad_checkpointing="true").config.grad_checkpointing is True
    assert stanvid.load_model(source, num_frames="3").config.num_frames == 3


@pytest.mark.parametrize(
    "key, value",
    [("num_frames", [4]), ("num_frames", "abc"), ("grad_checkpointing", "maybe"), ("grad_checkpointing", 1),
     ("mug_tau", True), ("image_mean", "a,b,c"), ("temporal", 3)],
)  # fmt: skip
def test_a_wrong_type_for_an_override_is_a_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model override {key}: expected"):
        tiny_config().replace(**{key: value})


@pytest.mark.parametrize(
    "section, field, value",
    [(None, "grad_checkpointing", "false"), ("stan", "depthwise", "no"), ("stan", "cls_residue", 0),
     (None, "name", 7), ("stan", "drop_path", "0.1"), (None, "mug_tau", "100")],
)  # fmt: skip
def test_config_fields_must_have_their_type(section, field, value):
    data = tiny_config().to_dict()
    (data[section] if section else data)[field] = value
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(data)


def test_set_grad_checkpointing_refuses_what_is_not_a_bool():
    model = tiny_model()
    with pytest.raises(ConfigError, match="grad_checkpointing"):
        model.set_grad_checkpointing("false")
    assert model.config.grad_checkpointing is False
    model.set_grad_checkpointing(True)
    assert model.config.grad_checkpointing is True


# ---------------------------------------------------------------------------------------- missing extras
def _without(modules: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """`stanvid ARGV` in a fresh interpreter where importing each of `modules` fails, as when not installed."""
    code = (
        "import sys\n"
        f"for name in {modules!r}:\n"
        "    sys.modules[name] = None  # `import name` raises ModuleNotFoundError(name=name)\n"
        "from stanvid.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    src = str(Path(stanvid.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "modules, argv, extra",
    [
        (["fastapi"], ["serve", "{index}", "--port", "8000"], "stanvid[search]"),
        (["faiss"], ["index", "{videos}", "--model", "{model}", "--out", "{index}"], "stanvid[search]"),
        (["faiss"], ["search", "{index}", "a clip", "-k", "3"], "stanvid[search]"),
    ],
    ids=["serve", "index", "search"],
)
def test_missing_extra_keeps_arguments_and_names_the_extra(modules, argv, extra, data, tmp_path):
    command = argv[0]
    where = {"index": str(tmp_path / "idx"), "videos": str(data["videos"]), "model": str(data["model"])}
    done = _without(modules, [a.format(**where) for a in argv])
    assert done.returncode == 2, done.stderr
    assert "unrecognized arguments" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"stanvid {command}: needs the package {modules[0]!r}; install it with: pip install '{extra}'"
    ]
    help_text = _without(modules, [command, "--help"])
    assert help_text.returncode == 0
    assert "--precision" in help_text.stdout  # every option is listed, not an empty stub
    if command == "serve":
        assert "--port" in help_text.stdout and "--host" in help_text.stdout

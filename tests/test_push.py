"""`push_to_hub` / `stanvid push` against a local folder standing in for the hub, and `load_model("user/repo")`
of what was pushed (no network: see the `fake_hub` fixture)."""

from __future__ import annotations

import json

import pytest
import torch

import stanvid
from stanvid.checkpoints.download import TOKENIZER_FILES
from stanvid.cli import main as cli_main
from stanvid.errors import CheckpointError, ConfigError
from stanvid.training.metrics import format_table
from stanvid.training.publish import push_to_hub

REPO = "someone/stan-tiny"


def eval_report() -> dict:
    """What `stanvid eval` writes (`runs.evaluate_run`): recipe facts plus a nested metrics table."""
    return {
        "recipe": "stan_msrvtt_b32",
        "task": "retrieval",
        "checkpoint": "runs/stan_msrvtt_b32/model",
        "test_annotations": "/data/msrvtt/test.csv",
        "num_videos": 1000,
        "num_texts": 1000,
        "metrics": {
            "stan (model)": {"t2v": {"R1": 46.9, "R5": 72.8, "R10": 82.8, "MdR": 2.0, "MnR": 14.1}},
        },
    }


@pytest.fixture
def run_folder(tmp_path, tiny_model):
    """A training run's folder: `model/` (save_pretrained) and `eval.json` beside it."""
    run = tmp_path / "runs" / "tiny"
    model = tiny_model("stan", seed=4)
    model.save_pretrained(run / "model")
    (run / "eval.json").write_text(json.dumps(eval_report(), indent=2))
    return run, model


def same_outputs(a: stanvid.VideoCLIP, b: stanvid.VideoCLIP) -> None:
    torch.manual_seed(0)
    cfg = a.config
    video = torch.randn(2, cfg.num_frames, 3, cfg.clip.vision.image_size, cfg.clip.vision.image_size)
    ids = stanvid.tokenize(["a dog runs", "rain on a window"], context_length=cfg.clip.text.context_length)
    with torch.no_grad():
        assert torch.equal(a.encode_video(video), b.encode_video(video))
        assert torch.equal(a.encode_text(ids), b.encode_text(ids))


def test_cli_push_then_load_by_repo_id(fake_hub, run_folder, capsys):
    run, model = run_folder
    assert cli_main(["push", str(run / "model"), REPO]) == 0
    assert f"https://huggingface.co/{REPO}" in capsys.readouterr().out
    repo = fake_hub.root / REPO
    assert sorted(p.name for p in repo.iterdir()) == [
        "README.md",
        "config.json",
        "eval.json",
        "model.safetensors",
    ]
    assert (repo / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    card = (repo / "README.md").read_text()
    assert "library_name: stanvid" in card
    assert f'stanvid.load_model("{REPO}")' in card and f"--model {REPO}" in card
    assert format_table(eval_report()["metrics"]) in card  # the run's metrics, as `stanvid eval` prints them
    assert "stan_msrvtt_b32" in card and "STAN branch (selfattn, depth 2)" in card
    config_json = card.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(config_json) == model.config.to_dict()
    loaded = stanvid.load_model(REPO)
    assert loaded.config == model.config
    same_outputs(loaded, model)
    assert {name for _, name in fake_hub.requested} == {"config.json", "open_clip_config.json",
                                                          "preprocessor_config.json", "model.safetensors",
                                                          *TOKENIZER_FILES}  # fmt: skip


def test_a_model_in_memory_pushes_without_metrics(fake_hub, tiny_model):
    model = tiny_model("meanP", seed=5)
    url = push_to_hub(model, REPO)
    assert url == f"https://huggingface.co/{REPO}"
    card = (fake_hub.root / REPO / "README.md").read_text()
    assert "## Evaluation" not in card and "mean of frame embeddings" in card
    same_outputs(stanvid.load_model(REPO), model)


def test_run_dir_names_where_the_metrics_are(fake_hub, run_folder, tmp_path):
    run, _ = run_folder
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ConfigError, match="no evaluation report"):
        push_to_hub(run / "model", REPO, run_dir=other)
    assert not (fake_hub.root / REPO).exists()  # nothing uploaded
    report = eval_report()
    report["metrics"] = {"meanP (model)": {"t2v": {"R1": 12.5}}}
    (other / "eval.json").write_text(json.dumps(report))
    push_to_hub(run / "model", REPO, run_dir=other)
    assert format_table(report["metrics"]) in (fake_hub.root / REPO / "README.md").read_text()


def test_bad_inputs_are_refused_before_uploading(fake_hub, run_folder, tmp_path, capsys, parity):
    run, _ = run_folder
    (run / "eval.json").write_text("{not json")
    assert cli_main(["push", str(run / "model"), REPO]) == 2
    assert "eval.json" in capsys.readouterr().err
    assert cli_main(["push", str(tmp_path / "missing"), REPO]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli_main(["push", str(run / "model"), "no-owner"]) == 2
    assert "owner/name" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a stanvid model folder"):
        push_to_hub(parity("stan_tiny_a") / "hf_clip", REPO)
    assert not (fake_hub.root / REPO).exists()


def test_push_without_the_client(monkeypatch, tiny_model):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(CheckpointError, match=r"stanvid\[hub\]"):
        push_to_hub(tiny_model("meanP"), REPO)

"""Recipes: every shipped config loads, the official values are where they belong, bad input is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stanvid.errors import ConfigError
from stanvid.training.recipe import Recipe, load_recipe, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MINIMAL = "task: retrieval\ndata:\n  dataset: msrvtt\n"


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    for dataset in ("msrvtt", "didemo", "lsmdc", "msvd"):
        assert {f"stan_{dataset}_b32", f"stan_{dataset}_b16"} <= names
    for dataset in ("k400", "ssv2"):
        assert {f"stan_{dataset}_b16_8f", f"stan_{dataset}_b16_16f"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.train.output_dir == f"runs/{path.stem}"
    assert recipe.model.num_frames == recipe.data.num_frames
    # the file states every field: nothing is left to a default that could change under it
    raw = yaml.safe_load(path.read_text())
    for section, values in recipe.to_dict().items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), (section, set(values) ^ set(raw[section]))
    again = load_recipe(_write(tmp_path, recipe.to_yaml()))
    assert again == recipe


# (frames, text length, batch per GPU, tau, STAN depth, grad checkpointing) from the official configs
# configs/exp/stan/stan_*_hf.py and the paper (SSv2: 6 layers).
OFFICIAL = {
    "stan_msrvtt_b32": (12, 32, 16, 0.01, 4, False),
    "stan_msrvtt_b16": (12, 32, 8, 0.02, 4, False),
    "stan_didemo_b32": (64, 77, 8, 0.05, 4, True),
    "stan_lsmdc_b32": (12, 32, 16, 0.01, 4, False),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_values(name):
    r = load_recipe(Path(CONFIGS[0]).parent / f"{name}.yaml")
    got = (
        r.data.num_frames,
        r.data.text_length,
        r.train.batch_size,
        r.train.temperature,
        r.model.stan_depth,
        r.model.grad_checkpointing,
    )
    assert got == OFFICIAL[name]
    assert r.optim.betas == (0.9, 0.98) and r.optim.eps == 1e-8 and r.optim.grad_clip == 5.0
    assert r.optim.new_param_lr_mult == 10.0 and r.optim.warmup_start_factor == 0.05
    assert r.data.flip is False


# Mug-STAN, from configs/exp/stan/mugstan_*.py: (train frames, test frames, text length, batch per GPU, tau, lr,
# weight decay, STAN lr multiplier, epochs, LinearLR end, cosine T_max, cosine begin, grad checkpointing)
MUG_OFFICIAL = {
    "mugstan_msrvtt_b32": (12, 32, 32, 16, 0.01, 2e-6, 0.02, 10.0, 100, 10.0, 4.5, 10.0, False),
    "mugstan_msrvtt_b16": (12, 32, 32, 8, 0.02, 1e-6, 0.2, 10.0, 100, 10.0, 4.5, 10.0, False),
    "mugstan_didemo_b32": (64, 64, 77, 8, 0.05, 2e-6, 0.01, 10.0, 20, 4.0, 17.0, 4.0, True),
    "mugstan_lsmdc_b32": (12, 12, 32, 16, 0.03, 2e-6, 0.1, 5.0, 100, 5.0, 4.5, 10.0, False),
    "mugstan_webvid10m_b32_pretrain": (8, 12, 64, 24, 0.01, 4e-6, 0.05, 10.0, 4, 0.5, 4.5, 0.5, False),
}


@pytest.mark.parametrize("name", sorted(MUG_OFFICIAL))
def test_mugstan_official_values(name):
    r = load_recipe(Path(CONFIGS[0]).parent / f"{name}.yaml")
    o = r.optim
    got = (
        r.data.num_frames,
        r.data.test_num_frames or r.data.num_frames,
        r.data.text_length,
        r.train.batch_size,
        r.train.temperature,
        o.lr,
        o.weight_decay,
        o.new_param_lr_mult,
        r.train.epochs,
        o.warmup_epochs,
        o.cosine_epochs,
        o.warmup_epochs + o.hold_epochs,
        r.model.grad_checkpointing,
    )
    assert got == MUG_OFFICIAL[name]
    assert (r.model.similarity, r.model.mug_mode, r.model.mug_tau) == ("mug", "mug_frame_token_simple", 100.0)
    assert r.model.stan_depth == 4 and r.optim.betas == (0.9, 0.98) and r.optim.grad_clip == 5.0


def test_ssv2_configs_use_six_layers_and_no_flip():
    for path in CONFIGS:
        r = load_recipe(path)
        if r.data.dataset == "ssv2":
            assert r.model.stan_depth == 6 and r.data.flip is False
        if r.data.dataset == "kinetics400":
            assert r.data.flip is True


def test_defaults_fill_missing_keys(tmp_path):
    r = load_recipe(_write(tmp_path, MINIMAL + "  num_frames: 20\n"))
    assert r == Recipe.from_dict({"task": "retrieval", "data": {"dataset": "msrvtt", "num_frames": 20}})
    assert r.model.num_frames == 20  # null takes data.num_frames
    assert r.optim.lr == 2e-6 and r.train.temperature == 0.01


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, MINIMAL + "optim:\n  learning_rate: 1.0e-5\n"))
    message = str(info.value)
    assert "r.yaml" in message and "'learning_rate'" in message and "optim" in message
    assert "valid keys: lr, new_param_lr_mult" in message
    with pytest.raises(ConfigError, match=r"unknown key 'trian' at the top level \(did you mean 'train'\?\)"):
        load_recipe(_write(tmp_path, MINIMAL + "trian:\n  epochs: 3\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.dataset=msrvt", r"data.dataset: 'msrvt' is not a valid choice; valid choices: msrvtt, didemo"),
        ("optim.lr=-1e-5", r"optim.lr must be > 0, got -1e-05"),
        ("train.batch_size=8.5", r"train.batch_size must be an integer, got 8.5"),
        (
            "train.precision=fp8",
            r"train.precision: 'fp8' is not a valid choice; valid choices: fp32, bf16, fp16",
        ),
        ("data.flip=maybe", r"data.flip must be true or false, got 'maybe'"),
        ("optim.betas=[0.9]", r"optim.betas must be a list of 2 numbers"),
        ("optim.betas=[0.98, 1.0]", r"optim.betas must be below 1"),
        ("train.temperature=hot", r"train.temperature must be a positive number \(tau\) or 'learnable'"),
        ("train.temperature=0", r"train.temperature must be > 0"),
        ("eval.num_crops=2", r"eval.num_crops: 2 is not a valid choice; valid choices: 1, 3"),
        (
            "model.temporal=lstm",
            r"model.temporal: 'lstm' is not a valid choice; valid choices: meanP, seqTransf, stan",
        ),
        (
            "optim.warmup_epochs=11",
            r"optim.warmup_epochs \(11.0\) \+ optim.hold_epochs \(0.0\) must not exceed train.epochs \(10\)",
        ),
        ("data.test_resize=200", r"data.test_resize \(200\) must be at least data.input_size \(224\)"),
        ("data.num_frames=65", r"exceeds STAN's time embedding"),
        ("task=recognition", r"'msrvtt' is a retrieval dataset but task is 'recognition'"),
    ],
)
def test_bad_values_name_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, MINIMAL), [override])


def test_required_keys_and_cross_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key data"):
        load_recipe(_write(tmp_path, "task: retrieval\n"))
    with pytest.raises(ConfigError, match=r"missing required key task \(one of retrieval, recognition\)"):
        load_recipe(_write(tmp_path, "data:\n  dataset: msrvtt\n"))
    with pytest.raises(ConfigError, match=r"data.class_names is required for recognition"):
        load_recipe(_write(tmp_path, "task: recognition\ndata:\n  dataset: kinetics400\n"))
    recognition = "task: recognition\ndata:\n  dataset: kinetics400\n  class_names: c.txt\n"
    with pytest.raises(
        ConfigError, match=r"eval.num_crops 3 needs data.test_resize = data.input_size \(224\)"
    ):
        load_recipe(_write(tmp_path, recognition), ["eval.num_crops=3", "data.test_resize=256"])
    assert load_recipe(_write(tmp_path, recognition), ["eval.num_crops=1", "data.test_resize=256"])


def test_overrides_use_yaml_scalars(tmp_path):
    r = load_recipe(
        _write(tmp_path, MINIMAL),
        [
            "optim.lr=1e-5",
            "optim.grad_clip=null",
            "optim.betas=[0.8, 0.9]",
            "data.flip=true",
            "train.temperature=learnable",
            "model.source=/weights/ViT-B-16.pt",
            "eval.dsl=false",
            "train.epochs=3",
            "optim.warmup_epochs=1",
        ],
    )
    assert r.optim.lr == 1e-5 and r.optim.grad_clip is None and r.optim.betas == (0.8, 0.9)
    assert r.data.flip is True and r.train.temperature == "learnable" and r.eval.dsl is False
    assert r.model.source == "/weights/ViT-B-16.pt" and r.train.epochs == 3
    # later overrides win
    assert load_recipe(_write(tmp_path, MINIMAL), ["train.seed=1", "train.seed=7"]).train.seed == 7


def test_override_errors(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        load_recipe(path, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in optim \(did you mean 'lr'\?\)"):
        load_recipe(path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"optim is a section; set one of its keys \(lr, "):
        load_recipe(path, ["optim=1"])
    with pytest.raises(ConfigError, match=r"optim.lr is a value, not a section"):
        load_recipe(path, ["optim.lr.x=1"])
    assert parse_override("data.root = /a=b") == (["data", "root"], "/a=b")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    r = load_recipe(_write(tmp_path, MINIMAL + "optim:\n  lr: 3e-6\n  eps: 1E-9\n"))
    assert r.optim.lr == 3e-6 and r.optim.eps == 1e-9
    with pytest.raises(ConfigError, match=r"optim.lr must be a number, got '3e-6'"):
        load_recipe(_write(tmp_path, MINIMAL + "optim:\n  lr: '3e-6'\n"))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.yaml: recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: invalid YAML \(line 4, column 10\): mapping values are not allowed"
    ):
        load_recipe(_write(tmp_path, MINIMAL + "  root: a: b\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"a recipe must be a mapping"):
        load_recipe(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"optim must be a mapping"):
        load_recipe(_write(tmp_path, MINIMAL + "optim: 3\n"))


def test_data_paths_resolve_against_root(tmp_path):
    r = load_recipe(_write(tmp_path, MINIMAL), [f"data.root={tmp_path}"])
    assert r.data.path("train.json") == tmp_path / "train.json"
    assert r.data.path("/abs/test.json") == Path("/abs/test.json")


def test_a_recipe_built_in_code_is_validated_and_typed_like_a_file():
    from stanvid.training.recipe import DataRecipe, ModelRecipe, OptimRecipe, TrainRecipe

    with pytest.raises(ConfigError, match=r"model\.temporal: 'lstm' is not a valid choice"):
        ModelRecipe(temporal="lstm")
    with pytest.raises(ConfigError, match=r"train\.batch_size must be an integer, got '16'"):
        TrainRecipe(batch_size="16")
    with pytest.raises(ConfigError, match=r"optim\.lr must be > 0"):
        OptimRecipe(lr=0.0)
    with pytest.raises(ConfigError, match="is a recognition dataset but task is 'retrieval'"):
        Recipe(task="retrieval", data=DataRecipe(dataset="kinetics400", class_names="c.txt"))
    with pytest.raises(ConfigError, match="data must be a DataRecipe"):
        Recipe(task="retrieval", data={"dataset": "csv"})
    built = Recipe(
        task="retrieval",
        data=DataRecipe(dataset="csv", num_frames=8, random_crop_area=[0.5, 1]),
        optim=OptimRecipe(lr=1, warmup_epochs=2),
    )
    assert built.model.num_frames == 8  # the null filled from data.num_frames, as from a file
    assert isinstance(built.optim.lr, float) and built.data.random_crop_area == (0.5, 1.0)
    assert built == Recipe.from_dict(built.to_dict())

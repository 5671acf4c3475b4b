"""The CLI with SigLIP 2 and PE-Core models: `stanvid index` + `stanvid search` with a non-English query, and
the two recipes (`configs/stan_msrvtt_siglip2_b16.yaml`, `configs/stan_msrvtt_pecore_b16.yaml`) trained end to
end on generated data, on the shared tiny references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import stanvid
from stanvid.cli import main
from test_cli_train import _write_dataset
from videogen import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GERMAN = "ein Hund läuft über eine Wiese"


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, make_frames(10, 40, 48, seed=5), fps=10, gop=5)
    return path


def test_index_and_search_a_german_query(parity, tmp_path, capsys):
    model_dir = parity("siglip2_openclip_a")
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"v{i}.mp4", make_frames(8, 40, 48, seed=30 + i), fps=8, gop=4)
    index = tmp_path / "idx"
    args = ["index", str(videos), "--model", str(model_dir), "--out", str(index), "--no-progress"]
    assert main(args + ["--set", "num_frames=4", "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), GERMAN, "--json", "-k", "3", "--precision", "fp32"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3
    # a second path: the model's own tokenizer (SigLIP 2's tokenizer.json, not CLIP's BPE) and the same clips
    model = stanvid.load_model(model_dir, num_frames=4)
    ids = model.tokenize([GERMAN])
    unk = 3  # the reference tokenizer's <unk>: every German word is in its vocabulary
    assert ids.shape == (1, 16) and unk not in ids.tolist()[0]
    opened = stanvid.open_index(index)
    with torch.no_grad():
        text = F.normalize(model.encode_text(ids), dim=-1)[0].numpy()
    scores = []
    for hit in hits:
        clip = opened.read_clip(hit["path"], hit["start"], hit["end"])
        scores.append(float(opened.embed_clips(clip[None])[0] @ text))
    # the index keeps its vectors in reduced precision: the scores agree to its rounding, the order exactly
    assert max(abs(s - h["score"]) for s, h in zip(scores, hits, strict=True)) < 3e-3
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, reference",
    [("stan_msrvtt_siglip2_b16", "siglip2_openclip_a"), ("stan_msrvtt_pecore_b16", "pecore_openclip_a")],
)
def test_recipe_trains_end_to_end(parity, clip_file, tmp_path, recipe, reference):
    from stanvid.training.recipe import load_recipe

    config = CONFIGS / f"{recipe}.yaml"
    root, out = tmp_path / "data", tmp_path / "out"
    sets = [
        f"data.root={root}", f"model.source={parity(reference)}", f"train.output_dir={out}",
        "model.stan_depth=2", "model.num_frames=4", "data.num_frames=4", "data.input_size=32",
        "data.train_resize=36", "data.test_resize=32", "data.text_length=16", "data.num_workers=0",
        "train.batch_size=2", "train.epochs=1", "optim.warmup_epochs=0.5", "optim.cosine_epochs=0.5", "train.max_steps=2", "train.precision=fp32", "train.log_every=1",
        "eval.batch_size=4", "eval.chunk_size=4",
    ]  # fmt: skip
    _write_dataset(load_recipe(config, sets), root, clip_file)
    args = ["train", str(config), "--no-progress"] + [x for item in sets for x in ("--set", item)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    saved = next((p for p in out.rglob("config.json")), None)
    if saved is not None:  # the trained model's folder carries its tokenizer
        again = stanvid.load_model(saved.parent)
        assert again.config.clip.family == stanvid.load_model(parity(reference)).config.clip.family
        assert torch.equal(again.tokenize([GERMAN]), stanvid.load_model(parity(reference)).tokenize([GERMAN]))

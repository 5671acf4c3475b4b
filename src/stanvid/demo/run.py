"""The demo pipeline: data -> image-text pretraining -> transfer with each temporal module -> evaluation -> report.

`run_demo(DemoConfig.create(out, quick=..., seed=...))` is what ``stanvid demo`` runs:

1. **data** (`stanvid.demo.synth`): the generated corpus under ``DIR/data``, real H.264 files and caption CSVs,
   then decoded once into memory (`Corpus.hold`, ~70 MB): every later stage reads those frames, so no stage
   decodes again and no worker process is needed; the compute threads take the cores (`DemoConfig.threads`).
2. **pretrain** (`stanvid.demo.pretrain`): a small CLIP learns single frames and captions of what one frame
   shows (object, size, position, "nothing"); saved with ``save_pretrained`` to ``DIR/clip``.
3. **zero-shot**: that CLIP, loaded back with `stanvid.load_model`, frames mean-pooled, no video training.
4. **transfer** (`stanvid.demo.transfer`): for ``meanP``, ``seqTransf``, STAN ``selfattn`` and STAN ``conv``,
   `stanvid.load_model(DIR/clip, temporal=...)` (a temporal module the checkpoint lacks starts from the paper's
   initialisation) trained by `stanvid.training.loop.fit` with the same budget.
5. **evaluation** (`stanvid.demo.evaluate`) and **report** (`stanvid.demo.report`): ``results.json``,
   ``report.md``, ``chart.png``, ``contact_sheet.png``; the STAN (self-attention) model in ``DIR/model``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stanvid.demo import evaluate as ev
from stanvid.demo import report as rp
from stanvid.demo.pretrain import PretrainConfig, load_frames, pretrain_clip
from stanvid.demo.synth import Corpus, CorpusConfig, make_corpus
from stanvid.demo.transfer import TransferConfig, training_set, transfer, transfer_recipe
from stanvid.errors import ConfigError, StanvidError
from stanvid.models.config import (
    CLIPConfig,
    ModelConfig,
    SeqTransfConfig,
    STANConfig,
    TextConfig,
    VisionConfig,
)

__all__ = ["TEMPORAL_MODELS", "DemoConfig", "DemoResult", "demo_model_config", "results_table", "run_demo"]

# results.json row -> load_model overrides
TEMPORAL_MODELS: dict[str, dict[str, str]] = {
    "meanP": {"temporal": "meanP"},
    "seqTransf": {"temporal": "seqTransf"},
    "stan_selfattn": {"temporal": "stan", "time_module": "selfattn"},
    "stan_conv": {"temporal": "stan", "time_module": "conv"},
}
# `stanvid demo --mug`: the STAN self-attention model trained and scored with Mug-STAN's head (stanvid.models.mug)
MUG_MODELS: dict[str, dict[str, str]] = {
    "mugstan": {"temporal": "stan", "time_module": "selfattn", "similarity": "mug"},
}
SHEET_MODELS = ("meanP", "stan_selfattn")


@dataclass
class DemoConfig:
    """Everything a demo run does; `create` gives the default and the ``--quick`` sizes."""

    out: Path = Path("stanvid-demo")
    quick: bool = False
    seed: int = 0
    mug: bool = False  # add the Mug-STAN row (MUG_MODELS)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    vision_width: int = 64
    vision_layers: int = 4
    text_width: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    context_length: int = 16
    stan_depth: int = 2
    threads: int | None = None  # compute threads; None: the cores left after any decoding workers, at most 4
    hold: bool = True  # decode the corpus once into memory (`Corpus.hold`); False reads the files every time
    progress: bool = True

    @classmethod
    def create(
        cls,
        out: str | Path = "stanvid-demo",
        quick: bool = False,
        seed: int = 0,
        progress: bool = True,
        mug: bool = False,
        precision: str = "fp32",
        threads: int | None = None,
    ) -> DemoConfig:
        """The default run (a few minutes on 2 cores) or the quick one (same pipeline, smaller; under a minute).

        ``precision``: the transfer runs' ``train.precision`` (`DEMO_PRECISIONS`). ``threads``: torch compute
        threads (default: the cores, at most 4); the table can differ by a few points with another count, as
        threads round some sums differently."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"the demo seed must be a non-negative integer, got {seed!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"the demo threads must be a positive integer, got {threads!r}")
        precision = demo_precision(precision)
        if quick:
            corpus = CorpusConfig(
                pretrain_per_object=3,
                pretrain_empty=3,
                train_appearance_per_object=2,
                train_order_groups=32,
                test_order_groups=12,
                seed=seed,
            )
            pretrain = PretrainConfig(steps=60, seed=seed)
            transfer = TransferConfig(steps=12, pairs_per_batch=8, seed=seed, precision=precision)
        else:
            corpus = CorpusConfig(seed=seed)
            pretrain = PretrainConfig(seed=seed)
            transfer = TransferConfig(seed=seed, precision=precision)
        return cls(
            out=Path(out),
            quick=quick,
            seed=seed,
            mug=bool(mug),
            corpus=corpus,
            pretrain=pretrain,
            transfer=transfer,
            threads=threads,
            progress=progress,
        )


@dataclass
class DemoResult:
    """What `run_demo` wrote and measured."""

    out: Path
    results: dict[str, Any]
    models: dict[str, rp.ModelResult]
    stage_seconds: dict[str, float]


# The transfer runs' train.precision. fp32 by default: the demo's model is so small (64 wide, 32 px frames) that
# bf16 autocast costs more in casts than it saves, 0.75x the fp32 speed of a step on this project's AVX512_BF16
# CPU, though its results keep their order and stay within a few points (docs/large-batches.md)
DEMO_PRECISIONS = ("fp32", "bf16")


def demo_precision(precision: str) -> str:
    """Check the transfer runs' ``train.precision``: ``fp32`` or ``bf16`` (bf16 autocast where the CPU has
    native bf16, fp32 elsewhere, with a note)."""
    if precision not in DEMO_PRECISIONS:
        raise ConfigError(
            f"the demo precision must be one of {', '.join(DEMO_PRECISIONS)}, got {precision!r}"
        )
    return precision


def demo_model_config(config: DemoConfig) -> ModelConfig:
    """The small CLIP of the demo (ViT with 8-pixel patches on 32-pixel frames) as a plain image-text model.

    `seq` and `stan` are set here so that ``load_model(..., temporal=...)`` builds the temporal modules at this
    scale: a 2-layer seqTransf (initialised from the 2-layer text tower, as CLIP4Clip does) and a STAN branch
    over the last `stan_depth` of the vision layers.
    """
    return ModelConfig(
        clip=CLIPConfig(
            embed_dim=config.embed_dim,
            vision=VisionConfig(
                width=config.vision_width,
                layers=config.vision_layers,
                heads=config.vision_width // 32,
                patch_size=8,
                image_size=config.corpus.image_size,
            ),
            text=TextConfig(
                width=config.text_width,
                layers=config.text_layers,
                heads=config.text_width // 32,
                context_length=config.context_length,
            ),
        ),
        temporal="meanP",
        stan=STANConfig(depth=config.stan_depth),
        seq=SeqTransfConfig(layers=config.text_layers),
        num_frames=config.corpus.num_frames,
        name="stanvid-demo",
    )


def _say(config: DemoConfig, text: str) -> None:
    if config.progress:
        print(text, file=sys.stderr, flush=True)


def _prepare_out(out: Path) -> Path:
    """Create DIR; a previous demo's corpus there is replaced, anything else named ``data`` is refused."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if data.exists():
        if not (data / "corpus.jsonl").is_file():
            raise StanvidError(f"{data} exists and is not a stanvid demo corpus; choose another --out folder")
        shutil.rmtree(data)
    return data


def _sheet_rows(
    gallery: ev.Gallery, order_sims: dict[str, torch.Tensor], corpus: Corpus
) -> list[rp.SheetRow]:
    """Both captions of the first test pair of each motion (not chosen by outcome), each with the top clip of
    every sheet model: a model blind to order returns the same clip for the two opposite captions."""
    from stanvid.video.decode import probe, read_frames
    from stanvid.video.sampling import uniform_indices

    first_group: dict[str, int] = {}
    for clip in gallery.clips:
        first_group.setdefault(clip.motion, clip.group)
    wanted = set(first_group.values())
    rows = []
    for q, v in enumerate(gallery.text_to_video.tolist()):
        if gallery.clips[v].group not in wanted:
            continue
        picks = []
        for name in SHEET_MODELS:
            scores = order_sims[name][q]  # (videos,)
            best = scores >= scores.max() - ev.TIE_TOLERANCE  # (videos,) the clips tied at the top
            top = v if bool(best[v]) else int(torch.argmax(scores))
            status = ("right" if int(best.sum()) == 1 else "tied") if bool(best[v]) else "wrong"
            source = corpus.source(gallery.clips[top].video)
            frames = read_frames(source, uniform_indices(probe(source).num_frames, corpus.config.num_frames))
            picks.append((name, frames.numpy(), status))
        rows.append(rp.SheetRow(caption=gallery.dataset.captions[q], picks=picks))
    return rows


def results_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table (what ``stanvid demo`` prints at the end)."""
    lines = [f"{'model':<14} {'appearance R@1/R@5':>19} {'order-only R@1/R@5':>19}"]
    for name, row in results["models"].items():
        a, o = row["appearance"], row["order"]
        lines.append(f"{name:<14} {a['R@1']:>9.1f} {a['R@5']:>9.1f} {o['R@1']:>9.1f} {o['R@5']:>9.1f}")
    lines.append(f"{'chance':<14} {'':>19} {results['chance']['R@1']:>9.1f}")
    lines.append(f"({results['seconds']:.0f} s; recalls in %, text to video)")
    return "\n".join(lines)


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Run the whole demo (see the module docstring) and write its report under `config.out`."""
    from stanvid.checkpoints.load import load_model

    config = config or DemoConfig.create()
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    # the matrices are tiny: more than a few threads only add overhead
    threads = config.threads or min(4, max(1, (os.cpu_count() or 1) - config.transfer.num_workers))
    torch.set_num_threads(threads)
    try:
        out = Path(config.out)
        data_dir = _prepare_out(out)
        stage: dict[str, float] = {}

        t = time.perf_counter()
        _say(config, f"[1/5] data: rendering and encoding the corpus in {data_dir}")
        corpus = make_corpus(data_dir, config.corpus, progress=config.progress)
        stage["data"] = time.perf_counter() - t
        if config.hold:
            t = time.perf_counter()
            held = corpus.hold(
                progress=config.progress
            )  # every later stage reads these frames, nothing decodes
            stage["decode"] = time.perf_counter() - t
            _say(config, f"      {len(corpus.held)} clips decoded once into memory ({held / 2**20:.0f} MiB)")

        t = time.perf_counter()
        _say(config, "[2/5] pretrain: image-text CLIP on single frames, captions of what one frame shows")
        torch.manual_seed(config.seed)
        from stanvid.models.video_clip import VideoCLIP

        clip = VideoCLIP(demo_model_config(config))
        frames = load_frames(corpus)
        pretrain_losses = pretrain_clip(clip, frames, config.pretrain, progress=config.progress)
        clip_dir = out / "clip"
        clip.save_pretrained(clip_dir)
        stage["pretrain"] = time.perf_counter() - t

        t = time.perf_counter()
        _say(config, "[3/5] zero-shot: the pretrained CLIP on the test split, no video training")
        galleries = ev.load_galleries(corpus, config.context_length)
        models: dict[str, rp.ModelResult] = {}
        order_sims: dict[str, torch.Tensor] = {}
        metrics, sims = ev.evaluate_model(load_model(clip_dir), galleries)
        models["zeroshot"] = rp.ModelResult(**metrics)
        order_sims["zeroshot"] = sims["order"]
        stage["zero-shot"] = time.perf_counter() - t

        train_set = training_set(corpus, config.transfer, config.context_length)
        _transfer_all(config, corpus, clip_dir, train_set, galleries, models, order_sims, stage)

        t = time.perf_counter()
        _say(config, "[5/5] report")
        chance = ev.order_blind_chance(galleries["order"])
        results = rp.results_dict(time.perf_counter() - started, models, chance)
        rp.draw_chart(out / "chart.png", results)
        rp.draw_contact_sheet(out / "contact_sheet.png", _sheet_rows(galleries["order"], order_sims, corpus))
        facts = _facts(config, corpus, galleries, clip, frames, pretrain_losses, threads)
        stage["report"] = time.perf_counter() - t
        results["seconds"] = time.perf_counter() - started
        rp.write_results(out / "results.json", results)
        rp.write_report(
            out / "report.md",
            results,
            models,
            facts=facts,
            stage_seconds=stage,
            chart="chart.png",
            sheet="contact_sheet.png",
        )
        _say(config, f"done in {results['seconds']:.0f} s")
        return DemoResult(out=out, results=results, models=models, stage_seconds=stage)
    finally:
        torch.set_num_threads(previous_threads)


def _transfer_all(
    config: DemoConfig,
    corpus: Any,
    clip_dir: Path,
    train_set: Any,
    galleries: dict[str, Any],
    models: dict[str, rp.ModelResult],
    order_sims: dict[str, torch.Tensor],
    stage: dict[str, float],
) -> None:
    """Stage 4: train each temporal model from the pretrained CLIP and evaluate it; results go into `models`,
    the order gallery's similarities into `order_sims`, the seconds into `stage`."""
    from stanvid.checkpoints.load import load_model

    out = Path(config.out)
    runs = {**TEMPORAL_MODELS, **(MUG_MODELS if config.mug else {})}
    for i, (name, overrides) in enumerate(runs.items()):
        t = time.perf_counter()
        _say(
            config,
            f"[4/5] transfer {i + 1}/{len(runs)}: {name} ({config.transfer.steps} steps)",
        )
        torch.manual_seed(config.seed)
        model = load_model(
            clip_dir, stan_depth=config.stan_depth, num_frames=config.corpus.num_frames, **overrides
        )
        recipe = transfer_recipe(
            corpus,
            config.transfer,
            clip_dir,
            overrides,
            items=len(train_set),
            stan_depth=config.stan_depth,
            context_length=config.context_length,
        )
        result = transfer(model, train_set, recipe, progress=config.progress)
        train_seconds = time.perf_counter() - t
        metrics, sims = ev.evaluate_model(model, galleries)
        models[name] = rp.ModelResult(
            **metrics, train_seconds=train_seconds, train_steps=result.steps, final_loss=result.last_loss
        )
        order_sims[name] = sims["order"]
        if name == "stan_selfattn":
            model.save_pretrained(out / "model")
        stage[name] = time.perf_counter() - t


def _facts(
    config: DemoConfig,
    corpus: Any,
    galleries: dict[str, Any],
    clip: Any,
    frames: Any,
    pretrain_losses: Any,
    threads: int,
) -> dict[str, Any]:
    """What the report says about the run: sizes, settings, chance levels."""
    out = Path(config.out)
    n_app = len(galleries["appearance"].clips)
    cc, tc, pc = config.corpus, config.transfer, config.pretrain
    return {
        "threads": threads,
        "workers": tc.num_workers,
        "held_mib": sum(v.nbytes for v in corpus.held.values()) / 2**20,
        "quick": config.quick,
        "seed": config.seed,
        "appearance_queries": len(galleries["appearance"].text_to_video),
        "appearance_gallery": n_app,
        "appearance_chance_r1": 100.0 / n_app,
        "appearance_chance_r5": min(100.0, 500.0 / n_app),
        "order_queries": len(galleries["order"].text_to_video),
        "order_gallery": len(galleries["order"].clips),
        "corpus": (
            f"{len(corpus.clips)} clips of {2 * cc.num_frames + 1} frames at {cc.image_size}x{cc.image_size} "
            f"(H.264, lossless): {len(corpus.select('pretrain'))} for pretraining, "
            f"{len(corpus.select('train'))} for video training "
            f"({len(corpus.select('train', 'order')) // 2} clip/reversal pairs), "
            f"{len(corpus.select('test'))} for testing; the model samples {cc.num_frames} frames per clip"
        ),
        "model": (
            f"ViT {config.vision_layers} layers x {config.vision_width} wide, patch 8, text "
            f"{config.text_layers} x {config.text_width}, embedding {config.embed_dim}; STAN depth "
            f"{config.stan_depth}, seqTransf {config.text_layers} layers; "
            f"{clip.num_parameters() / 1e6:.1f} M parameters in the CLIP"
        ),
        "pretrain": (
            f"{pc.steps} steps of {min(pc.batch_size, len(frames.captions))} frames, AdamW lr {pc.lr:g}, "
            f"{len(frames.images)} frames; final loss {np.mean(pretrain_losses[-10:]):.3f}"
        ),
        "transfer": (
            f"`stanvid.training.loop.fit`, {tc.steps} steps of {2 * tc.pairs_per_batch} clips (each with its "
            f"reversal, or two appearance clips), AdamW lr {tc.lr:g} (temporal module x"
            f"{tc.new_param_lr_mult:g}), tau {tc.temperature:g}, warmup then cosine, train.precision "
            f"{tc.precision}"
        ),
        "model_dir": str(out / "model"),
    }

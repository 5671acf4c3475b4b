"""Zero-shot classification of your videos: the text classifier the recognition recipes build, applied to files.

The classifier is the one `stanvid.training.loop` builds for recognition (`encode_class_names`): every class name is
written into each prompt template, the prompts are encoded by the text tower, and a class's weight is the mean of
its prompts' L2-normalized embeddings, normalized again (prompt ensembling, as in CLIP's zero-shot evaluation).
A video is embedded as the index embeds it (`num_frames` frames sampled uniformly over the whole file, resized
and centre-cropped: `stanvid.search.index.read_clip` / `encode_clips`) and scored against every class by cosine
similarity times the model's `logit_scale`; the softmax of those logits is the reported probability.

Label sets shipped with the package (`stanvid/assets/labels/`, sources cited in each file): `kinetics400`
(400 classes) and `ssv2` (Something-Something v2, 174 classes). Any other list is a file read by
`stanvid.data.read_class_names` (`.txt` one name per line, `.csv` `id,name`, `.json` list or name -> index).

Prompt templates (`TEMPLATES`, `{}` is the class name; pass `templates=("{}",)` to use the names as they are,
e.g. labels that are already captions):

    a video of {}.                 a video of a person {}.        a video of a person doing {}.
    a video of someone {}.         a clip of {}.                  a clip showing {}.
    an example of {}.              a demonstration of {}.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stanvid.checkpoints.onnx_runtime import OnnxEncoder
from stanvid.distributed import default_device
from stanvid.errors import ClassifyError, VideoReadError
from stanvid.models.video_clip import VideoCLIP
from stanvid.precision import InferencePrecision, prepare_for_inference

__all__ = [
    "LABEL_SETS",
    "TEMPLATES",
    "ClassifyError",
    "ClassifyReport",
    "Prediction",
    "class_weights",
    "classify",
    "load_labels",
    "write_predictions",
]

LABEL_SETS = ("kinetics400", "ssv2")
TEMPLATES: tuple[str, ...] = (
    "a video of {}.",
    "a video of a person {}.",
    "a video of a person doing {}.",
    "a video of someone {}.",
    "a clip of {}.",
    "a clip showing {}.",
    "an example of {}.",
    "a demonstration of {}.",
)
OUTPUT_FORMATS = (".csv", ".json")


@dataclass(frozen=True)
class Prediction:
    """The top classes of one video, best first, with softmax probabilities over all classes."""

    path: str
    labels: list[str]
    scores: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "labels": self.labels, "scores": self.scores}


@dataclass
class ClassifyReport:
    predictions: list[Prediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)

    def summary(self) -> str:
        lines = [f"{len(self.predictions)} videos classified, {len(self.failed)} unreadable"]
        if self.failed:
            lines.append("unreadable videos (not classified):")
            lines += [f"  {path}: {error}" for path, error in self.failed]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- classifier
def labels_dir() -> Path:
    return Path(str(resources.files("stanvid") / "assets" / "labels"))


def load_labels(labels: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names: a shipped set by name (`LABEL_SETS`), a file, or a list of names."""
    from stanvid.data import read_class_names
    from stanvid.errors import DatasetError

    if isinstance(labels, (str, os.PathLike)):
        name = os.fspath(labels)
        if name in LABEL_SETS:
            return read_class_names(labels_dir() / f"{name}.txt")
        if not Path(name).is_file():
            raise ClassifyError(
                f"labels {name!r}: not a shipped label set ({', '.join(LABEL_SETS)}) nor an existing file"
            )
        try:
            return read_class_names(name)
        except (DatasetError, UnicodeDecodeError) as exc:
            raise ClassifyError(f"labels {name}: {exc}") from None
    names = [str(n) for n in labels]
    if not names or any(not n.strip() for n in names):
        raise ClassifyError("the class names must be a non-empty list of non-empty names")
    if len(set(names)) != len(names):
        raise ClassifyError("the class names contain duplicates")
    return names


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ClassifyError("no prompt templates given")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1 or "{" in t.replace("{}", ""):
            raise ClassifyError(f"prompt template {t!r} must contain exactly one '{{}}' and no other braces")
    return templates


def class_weights(
    model: VideoCLIP,
    class_names: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    device: Any = None,
    runner: InferencePrecision | None = None,
) -> torch.Tensor:
    """`(K, D)` L2-normalized class weights: each name in every template, encoded by the recognition recipes'
    `encode_class_names`, averaged over the templates and normalized. `runner`
    (`stanvid.precision.prepare_for_inference`): the precision to encode in; float32 without."""
    from stanvid.models.heads import encode_class_names

    templates = _check_templates(templates)
    prompts = [t.format(name) for name in class_names for t in templates]  # (K * P,)
    context = model.config.clip.text.context_length
    runner = runner if runner is not None else prepare_for_inference(model, "fp32", device)
    with runner.autocast():
        feats = encode_class_names(runner.model, prompts, context, device)  # (K * P, D), normalized float32
    feats = feats.view(len(class_names), len(templates), -1).mean(dim=1)  # (K, D)
    return F.normalize(feats, dim=-1)


# ---------------------------------------------------------------------------------------------- videos
def _inputs(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    from stanvid.search.index import find_videos

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return find_videos(path)
        if path.is_file():
            return [path]
        raise ClassifyError(f"{source}: no such video file or folder")
    return [Path(p).expanduser() for p in source]


@torch.inference_mode()
def classify(
    videos: str | os.PathLike | Sequence[str | os.PathLike],
    model: str | os.PathLike | VideoCLIP,
    labels: str | os.PathLike | Sequence[str] = "kinetics400",
    *,
    templates: Sequence[str] = TEMPLATES,
    top: int = 5,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = True,
    on_prediction: Callable[[Prediction], None] | None = None,
    runtime: str | None = None,
) -> ClassifyReport:
    """Zero-shot classify one video, a folder (recursively) or a list of files.

    `model` is any `stanvid.load_model` source or a `VideoCLIP`; `labels` a shipped set (`"kinetics400"`,
    `"ssv2"`), a class-name file or a list. Returns the `top` classes of each readable video, and the
    unreadable ones with their error (they do not stop the run). `precision`: as for `stanvid.search.index.build_index`
    (`auto`: bf16 where the CPU or GPU has native bf16; the scores are computed in float32 either way);
    `runtime`: what runs a model source (`stanvid.load_model`: torch, or onnxruntime through its export)."""
    from stanvid.search.index import encode_clips, read_clip
    from stanvid.video.decode import probe

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ClassifyError(f"top must be a positive integer, got {top!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ClassifyError(f"batch_size must be a positive integer, got {batch_size!r}")
    names = load_labels(labels)
    templates = _check_templates(templates)
    files = _inputs(videos)
    if not isinstance(model, (VideoCLIP, OnnxEncoder)):
        from stanvid.checkpoints.load import load_model

        model = load_model(model, runtime=runtime)
    dev = torch.device(device) if device is not None else default_device()
    model = model.eval().to(dev)
    runner = prepare_for_inference(model, precision, dev)
    weights = class_weights(model, names, templates, dev, runner)  # (K, D)
    scale = model.logit_scale.exp().float()
    cfg = model.config
    report = ClassifyReport()
    k = min(top, len(names))
    pending: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        emb = torch.from_numpy(
            encode_clips(model, torch.stack([c for _, c in pending]), dev, runner=runner)
        ).to(dev)  # (b, D)
        probs = (scale * emb @ weights.t()).softmax(dim=-1)  # (b, K)
        best = probs.topk(k, dim=-1)
        for (path, _), values, indices in zip(
            pending, best.values.tolist(), best.indices.tolist(), strict=True
        ):
            pred = Prediction(str(path), [names[i] for i in indices], [float(v) for v in values])
            report.predictions.append(pred)
            if on_prediction is not None:
                on_prediction(pred)
        pending.clear()

    for path in tqdm(files, desc="classifying", unit="video", disable=not progress):
        try:
            info = probe(path)
            clip = read_clip(
                path,
                0.0,
                info.duration,
                clip_len=cfg.num_frames,
                image_size=cfg.clip.vision.image_size,
                fit=cfg.clip.preprocess.fit,
            )  # (T, 3, S, S) uint8
        except VideoReadError as exc:
            report.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
            continue
        pending.append((path, clip))
        if len(pending) >= batch_size:
            flush()
    flush()
    return report


# ---------------------------------------------------------------------------------------------- output
def write_predictions(predictions: Sequence[Prediction], out: str | os.PathLike) -> Path:
    """Write predictions to `.csv` (`path,label_1,score_1,...`) or `.json` (a list), atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ClassifyError(f"{out}: the output must end in {' or '.join(OUTPUT_FORMATS)}")
    if not out.parent.is_dir():
        raise ClassifyError(f"{out}: folder {out.parent} does not exist")
    if suffix == ".json":
        text = json.dumps([p.to_dict() for p in predictions], indent=1)
    else:
        width = max((len(p.labels) for p in predictions), default=0)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", *[f"{c}_{i}" for i in range(1, width + 1) for c in ("label", "score")]])
        for p in predictions:
            writer.writerow([p.path, *[x for pair in zip(p.labels, p.scores, strict=True) for x in pair]])
        text = buf.getvalue()
    from stanvid.fileio import atomic_write_bytes

    atomic_write_bytes(out, text.encode())
    return out

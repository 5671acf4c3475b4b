"""Evaluating moments: temporal IoU, R1@IoU and mAP@IoU as QVHighlights' standalone evaluator defines them, and
`evaluate_moments` (`stanvid eval-moments`): a QVHighlights annotation file over your own copy of its videos.

Definitions (Lei et al., 2021, "QVHighlights"; moment_detr's ``standalone_eval``), for one query with ground-truth
windows G and predicted windows P ranked by score (at most `MAX_PREDICTIONS` are read):

* **R1@t**: the top prediction's IoU with the ground-truth window it overlaps most is >= t (mean over queries).
* **AP@t**: predictions in score order are matched, each to the unmatched ground-truth window of highest IoU
  when that IoU is >= t (a true positive), else a false positive; AP is the area under the precision-recall
  curve with precision made monotone (VOC 2011 all-point interpolation), recall over |G|. **mAP@t** is the mean
  over queries.

Both are reported in percent, as the reference prints them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.errors import QueryError

__all__ = [
    "MAX_PREDICTIONS",
    "MomentAnnotation",
    "MomentEvaluation",
    "average_precision",
    "evaluate_moments",
    "load_qvh_annotations",
    "moment_metrics",
    "temporal_iou",
]

MAX_PREDICTIONS = 10  # predicted windows read per query for mAP (the reference's max_pred_windows)


def temporal_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [start, end] spans in seconds (0 when they do not overlap or both are empty)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 and inter > 0 else 0.0


def _interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under a precision-recall curve, precision made non-increasing from the right (VOC 2011)."""
    prec = np.concatenate([[0.0], precision, [0.0]])
    rec = np.concatenate([[0.0], recall, [1.0]])
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    steps = np.flatnonzero(rec[1:] != rec[:-1]) + 1
    return float(np.sum((rec[steps] - rec[steps - 1]) * prec[steps]))


def average_precision(
    truth: Sequence[Sequence[float]], predicted: Sequence[Sequence[float]], threshold: float
) -> float:
    """AP of one query at one IoU threshold: `predicted` [(start, end, score), ...] against the windows of
    `truth` [(start, end), ...] (see the module docstring)."""
    if not truth:
        return 0.0
    preds = sorted(predicted[:MAX_PREDICTIONS], key=lambda p: -p[2])
    used = [False] * len(truth)
    hits = np.zeros(len(preds))
    for i, p in enumerate(preds):
        ious = [temporal_iou(p, g) for g in truth]
        for j in np.argsort(ious, kind="stable")[::-1]:
            if ious[j] < threshold:
                break
            if not used[j]:
                used[j], hits[i] = True, 1.0
                break
    if not len(preds):
        return 0.0
    tp = np.cumsum(hits)
    fp = np.cumsum(1.0 - hits)
    return _interpolated_ap(tp / (tp + fp), tp / len(truth))


def moment_metrics(
    truths: Sequence[Sequence[Sequence[float]]],
    predictions: Sequence[Sequence[Sequence[float]]],
    r1: Sequence[float] = (0.5, 0.7),
    ap: Sequence[float] = (0.5, 0.75),
) -> dict[str, float]:
    """R1@t (for t in `r1`), mAP@t (for t in `ap`), in percent, and the mean IoU of the top prediction (a
    fraction): query i has ground-truth windows `truths[i]` and predictions `predictions[i]` ((start, end,
    score), best first). A query without prediction counts as a miss."""
    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} queries but {len(predictions)} prediction lists")
    best = [max((temporal_iou(p[0], g) for g in t), default=0.0) if p else 0.0
            for t, p in zip(truths, predictions, strict=True)]  # fmt: skip
    out = {f"R1@{t:g}": 100.0 * float(np.mean([b >= t for b in best])) for t in r1}
    for t in ap:
        scores = [average_precision(g, p, t) for g, p in zip(truths, predictions, strict=True)]
        out[f"mAP@{t:g}"] = 100.0 * float(np.mean(scores))
    out["mIoU"] = float(np.mean(best)) if best else 0.0
    return out


# ---------------------------------------------------------------------------------------------- QVHighlights
@dataclass(frozen=True)
class MomentAnnotation:
    """One query of a QVHighlights-format annotation file."""

    qid: Any
    query: str
    vid: str
    duration: float
    windows: list[tuple[float, float]]


def load_qvh_annotations(path: str | os.PathLike) -> list[MomentAnnotation]:
    """Read a QVHighlights annotation file (JSON lines with `qid`, `query`, `vid`, `duration`,
    `relevant_windows`); a bad line is a `QueryError` naming the file, the line and the field."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QueryError(f"{path}: cannot read the annotations ({exc})") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            out.append(_annotation(line, f"{path}: line {n}"))
    if not out:
        raise QueryError(f"{path}: no annotations")
    return out


def _annotation(line: str, where: str) -> MomentAnnotation:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise QueryError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(row, dict):
        raise QueryError(f"{where}: not a JSON object")
    for key in ("qid", "query", "vid", "duration", "relevant_windows"):
        if key not in row:
            raise QueryError(f"{where}: no {key!r}")
    if not isinstance(row["query"], str) or not row["query"].strip():
        raise QueryError(f"{where}: 'query' is not a text")
    if not isinstance(row["vid"], str) or not row["vid"] or "/" in row["vid"] or row["vid"].startswith("."):
        raise QueryError(f"{where}: 'vid' is not a video name")
    duration = row["duration"]
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not duration > 0:
        raise QueryError(f"{where}: 'duration' is not a positive number")
    windows = row["relevant_windows"]
    if not isinstance(windows, list) or not windows:
        raise QueryError(f"{where}: 'relevant_windows' is not a non-empty list of [start, end]")
    spans = []
    for w in windows:
        ok = (
            isinstance(w, list)
            and len(w) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in w)
        )
        if not ok or not (math.isfinite(w[0]) and math.isfinite(w[1]) and 0 <= w[0] < w[1]):
            raise QueryError(
                f"{where}: 'relevant_windows' holds {w!r}, not [start, end] with 0 <= start < end"
            )
        spans.append((float(w[0]), float(w[1])))
    return MomentAnnotation(row["qid"], row["query"], row["vid"], float(duration), spans)


@dataclass
class MomentEvaluation:
    """What `evaluate_moments` measured: the metrics, each query's predictions ((start, end, score), best
    first) in the reference's submission format, and the queries whose video was not found."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        m = self.metrics
        line = (
            f"R1@0.5 {m['R1@0.5']:.2f}  R1@0.7 {m['R1@0.7']:.2f}  mAP@0.5 {m['mAP@0.5']:.2f}  "
            f"mAP@0.75 {m['mAP@0.75']:.2f}  (mean IoU of the top moment {m['mIoU']:.3f}; "
            f"{len(self.predictions)} queries)"
        )
        if self.missing:
            line += f"\n{len(self.missing)} queries without their video (counted as misses): " + ", ".join(
                self.missing[:5]
            )
        return line


def evaluate_moments(
    annotations: str | os.PathLike | Sequence[MomentAnnotation],
    video_dir: str | os.PathLike,
    model: Any,
    *,
    index: str | os.PathLike | None = None,
    progress: bool = False,
    **build: Any,
) -> MomentEvaluation:
    """Moment retrieval on a QVHighlights-format annotation file over the videos in `video_dir` (`<vid>.<ext>`):
    the folder is indexed with `model` (into `index`, kept and updated; a temporary folder without it), then
    each query's moments are cut in its own video (`stanvid.search.moments`), and scored as the standalone
    evaluator scores them (`moment_metrics`). `build` goes to `build_index`."""
    import tempfile

    from stanvid.search.index import build_index, open_index

    rows = (
        load_qvh_annotations(annotations) if isinstance(annotations, str | os.PathLike) else list(annotations)
    )
    with tempfile.TemporaryDirectory(prefix="stanvid-eval-moments-") as tmp:
        out = Path(index) if index is not None else Path(tmp) / "index"
        build_index(video_dir, out, model, progress=progress, **build)
        with open_index(
            out, model=model if not isinstance(model, str | os.PathLike) else None, follow=None
        ) as ix:
            return _evaluate(ix, rows)


def _evaluate(index: Any, rows: list[MomentAnnotation]) -> MomentEvaluation:
    from stanvid.search.moments import file_moments

    by_stem: dict[str, int] = {}
    for fid, relpath in index.files():
        by_stem.setdefault(Path(relpath).stem, fid)
        by_stem.setdefault(Path(relpath).with_suffix("").as_posix(), fid)
    texts = sorted({r.query for r in rows})
    vectors = dict(zip(texts, index.embed_text(texts), strict=True))
    result = MomentEvaluation(metrics={})
    preds = []
    for r in rows:
        fid = by_stem.get(r.vid)
        found = [] if fid is None else file_moments(index, fid, vectors[r.query], limit=MAX_PREDICTIONS)
        if fid is None:
            result.missing.append(r.vid)
        windows = [(m.start, m.end, m.score) for m in found]
        preds.append(windows)
        result.predictions.append({"qid": r.qid, "query": r.query, "vid": r.vid,
                                   "pred_relevant_windows": [list(w) for w in windows]})  # fmt: skip
    result.metrics = moment_metrics([r.windows for r in rows], preds)
    return result

"""The demo's outputs: ``results.json``, ``report.md``, a bar chart and a contact sheet (PNG, drawn with Pillow).

``results.json`` (read by tests and users)::

    {"seconds": float,
     "models": {"zeroshot" | "meanP" | "seqTransf" | "stan_selfattn" | "stan_conv":
                {"appearance": {"R@1": float, "R@5": float}, "order": {"R@1": float, "R@5": float}}},
     "chance": {"R@1": float}}

Recalls are text-to-video, in percent. ``chance`` is the order-only R@1 of a model that cannot see frame order
(see `stanvid.demo.run` for how it is computed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stanvid.fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "MODEL_ROWS",
    "ModelResult",
    "SheetRow",
    "results_dict",
    "write_results",
    "write_report",
    "draw_chart",
    "draw_contact_sheet",
]

# row key -> what the row is, in the order the table lists them
MODEL_ROWS: dict[str, str] = {
    "zeroshot": "the pretrained image-text CLIP, frames mean-pooled, no video training",
    "meanP": "video transfer, frame embeddings mean-pooled (no temporal module)",
    "seqTransf": "video transfer, CLIP4Clip's transformer over the frame embeddings",
    "stan_selfattn": "video transfer, STAN branch with temporal self-attention",
    "stan_conv": "video transfer, STAN branch with a temporal 3D convolution",
    "mugstan": "video transfer, STAN self-attention trained and scored by Mug-STAN's token-by-frame head (--mug)",
}
_KINDS = ("appearance", "order")


@dataclass
class ModelResult:
    """Text-to-video recalls of one model on the two query sets, plus what it cost."""

    appearance: dict[str, float]  # {"R@1", "R@5"}
    order: dict[str, float]
    reversal: float = 50.0  # % of order queries whose clip scores above its reversal
    train_seconds: float = 0.0
    train_steps: int = 0
    final_loss: float | None = None


@dataclass
class SheetRow:
    """One order-only query of the contact sheet: the top clip of two models, as frames."""

    caption: str
    # (model, frames (T, H, W, 3) uint8 of its top clip, "right" | "tied" (with the right clip) | "wrong")
    picks: list[tuple[str, np.ndarray, str]]


def results_dict(seconds: float, models: dict[str, ModelResult], chance_r1: float) -> dict[str, Any]:
    """The ``results.json`` document (schema in the module docstring)."""
    return {
        "seconds": float(seconds),
        "models": {
            name: {kind: {k: float(v) for k, v in getattr(res, kind).items()} for kind in _KINDS}
            for name, res in models.items()
        },
        "chance": {"R@1": float(chance_r1)},
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _data_note(facts: dict[str, Any]) -> str:
    held = facts.get("held_mib") or 0.0
    workers = f"{facts['workers']} decoding worker(s)"
    return f"the corpus decoded once into memory ({held:.0f} MiB), {workers}" if held else workers


def write_report(
    path: Path,
    results: dict[str, Any],
    models: dict[str, ModelResult],
    *,
    facts: dict[str, Any],
    stage_seconds: dict[str, float],
    chart: str,
    sheet: str | None,
) -> None:
    """``report.md``: the table, what each row and column means, the corpus and model, and the time taken."""
    chance = results["chance"]["R@1"]
    lines = [
        "# stanvid demo: what temporal modeling buys",
        "",
        f"Finished in **{results['seconds']:.0f} s** ({facts['threads']} compute thread(s), "
        f"{_data_note(facts)}; {'quick' if facts['quick'] else 'default'} size, seed {facts['seed']}).",
        "",
        "Text-to-video retrieval on the generated test split, recalls in percent:",
        "",
        "| model | appearance R@1 | appearance R@5 | order-only R@1 | order-only R@5 | clip above its reversal |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["models"].items():
        a, o = row["appearance"], row["order"]
        lines.append(
            f"| {name} | {_fmt(a['R@1'])} | {_fmt(a['R@5'])} | {_fmt(o['R@1'])} | {_fmt(o['R@5'])} "
            f"| {_fmt(models[name].reversal)} |"
        )
    lines += [
        f"| *chance* | {_fmt(facts['appearance_chance_r1'])} | {_fmt(facts['appearance_chance_r5'])} "
        f"| {_fmt(chance)} | | 50.0 |",
        "",
        f"![recall chart]({chart})",
        "",
        "## What the rows are",
        "",
    ]
    for name in results["models"]:
        res = models[name]
        cost = f" ({res.train_steps} steps, {res.train_seconds:.0f} s" if res.train_steps else ""
        if cost and res.final_loss is not None:
            cost += f", final loss {res.final_loss:.3f}"
        lines.append(f"- **{name}**: {MODEL_ROWS[name]}{cost + ')' if cost else ''}.")
    lines += [
        "",
        "Every video model starts from the same pretrained CLIP and gets the same training budget (steps, batch, "
        "learning rates, temperature); only the temporal module differs.",
        "",
        "## What the columns are",
        "",
        f'- **appearance**: {facts["appearance_queries"]} queries such as "a red circle", answerable from any '
        f"single frame, ranked against {facts['appearance_gallery']} test clips (one per object). Chance: "
        f"R@1 {_fmt(facts['appearance_chance_r1'])}, R@5 {_fmt(facts['appearance_chance_r5'])}.",
        f'- **order-only**: {facts["order_queries"]} queries such as "a red circle moves to the left", '
        '"... grows big", "nothing then a red circle", "a red circle turns into a red square", ranked against '
        f"{facts['order_gallery']} test clips. Every clip's **reversal** is in the gallery with the opposite "
        "caption: the two hold exactly the same frames (same files decoded backwards, same sampled frame set), "
        "so a model that ignores frame order scores them the same for any query and can at best guess between "
        f"them. Its best R@1 is therefore {_fmt(chance)} (the *chance* row), reached when it gets the object "
        "and the kind of motion right; R@5 is near 100 for any model that does, because the only clip that "
        "shares the frames is the reversal. Above-chance order R@1 needs frame order; below it, the model also "
        "confuses the object or the kind of motion. Scores tied to within float rounding count as a random "
        "tie-break (the expected recall), so a model blind to order gets half a hit on each pair it finds.",
        "- **clip above its reversal**: for the order-only queries, how often the model scores the right clip "
        "above its reversal (a tie counts one half): frame order alone, whatever the model makes of the objects. "
        "50 is a coin flip.",
        "",
        "## The run",
        "",
        f"- Corpus: {facts['corpus']}.",
        f"- Model: {facts['model']}.",
        f"- Pretraining: {facts['pretrain']}.",
        f"- Transfer: {facts['transfer']}.",
        "- Time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items()) + ".",
        f'- The trained STAN (self-attention) model is in `model/`: `stanvid.load_model("{facts["model_dir"]}")`.',
    ]
    if sheet:
        lines += [
            "",
            "## Order-only queries: what meanP and STAN retrieve first",
            "",
            "Both captions of one test pair per kind of motion. Each line shows the frames the model saw of its top "
            "clip, left to right in time: green, the right clip; red, another clip (often the reversal); amber, "
            "the right clip tied with its reversal, so the model's answer is a coin flip (meanP always is).",
            "",
            f"![contact sheet]({sheet})",
        ]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ drawing
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


_BLUE = (66, 110, 200)
_ORANGE = (230, 135, 40)
_GREY = (120, 120, 120)
_STATUS = {
    "right": ((40, 160, 60), "right clip"),
    "wrong": ((200, 50, 50), "wrong clip"),
    "tied": ((215, 150, 20), "tied: coin flip"),
}


def draw_chart(path: Path, results: dict[str, Any]) -> None:
    """Grouped bars: appearance and order-only R@1 per model, with the order-blind chance line."""
    names = list(results["models"])
    width, height = 140 + 130 * len(names), 420
    left, right, top, bottom = 60, 20, 50, 80
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    plot_h = height - top - bottom

    def y_of(value: float) -> float:
        return top + plot_h * (1 - value / 100.0)

    draw.text((left, 12), "Text-to-video R@1 (%) on the generated test split", fill="black", font=font)
    for tick in range(0, 101, 20):
        y = y_of(tick)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        label = str(tick)
        draw.text((left - 8 - _text_width(draw, label, small), y - 7), label, fill="black", font=small)
    group_w = (width - left - right) / len(names)
    bar_w = group_w * 0.3
    for i, name in enumerate(names):
        x0 = left + i * group_w + group_w * 0.18
        for j, (kind, colour) in enumerate((("appearance", _BLUE), ("order", _ORANGE))):
            value = results["models"][name][kind]["R@1"]
            bx = x0 + j * (bar_w + 4)
            draw.rectangle([bx, y_of(value), bx + bar_w, y_of(0)], fill=colour)
            label = f"{value:.0f}"
            draw.text(
                (bx + bar_w / 2 - _text_width(draw, label, small) / 2, y_of(value) - 16),
                label,
                fill="black",
                font=small,
            )
        cx = left + i * group_w + group_w / 2
        draw.text((cx - _text_width(draw, name, small) / 2, y_of(0) + 8), name, fill="black", font=small)
    chance = results["chance"]["R@1"]
    y = y_of(chance)
    for x in range(left, width - right, 12):
        draw.line([(x, y), (min(x + 6, width - right), y)], fill=_GREY, width=2)
    draw.line([(left, top), (left, y_of(0))], fill="black")
    draw.line([(left, y_of(0)), (width - right, y_of(0))], fill="black")
    legend_y = height - 34
    items = (("appearance queries", _BLUE), ("order-only queries", _ORANGE), ("order-blind chance", _GREY))
    x = left
    for label, colour in items:
        draw.rectangle([x, legend_y + 3, x + 12, legend_y + 13], fill=colour)
        draw.text((x + 18, legend_y), label, fill="black", font=small)
        x += 36 + _text_width(draw, label, small)
    _save_png(img, path)


def draw_contact_sheet(path: Path, rows: Sequence[SheetRow], scale: int = 2) -> None:
    """For each query: its caption, then one line of frames per model (its top clip), marked right or wrong."""
    if not rows:
        raise ValueError("draw_contact_sheet needs at least one row")
    t, h, w = rows[0].picks[0][1].shape[:3]
    fw, fh, gap = w * scale, h * scale, 2
    label_w, caption_h, pad = 150, 24, 8
    line_h = fh + gap * 2
    width = pad * 2 + label_w + t * (fw + gap)
    row_h = caption_h + line_h * len(rows[0].picks) + pad
    img = Image.new("RGB", (width, pad + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    y = pad
    for row in rows:
        draw.text((pad, y + 4), f"\u201c{row.caption}\u201d", fill="black", font=font)
        y += caption_h
        for label, frames, status in row.picks:
            mark = _STATUS[status][0]
            draw.rectangle([pad, y + 4, pad + 10, y + 14], fill=mark)
            draw.text((pad + 16, y + 2), label, fill="black", font=small)
            draw.text((pad + 16, y + 18), _STATUS[status][1], fill=mark, font=small)
            for k in range(t):
                tile = Image.fromarray(frames[k]).resize((fw, fh), Image.NEAREST)
                x = pad + label_w + k * (fw + gap)
                img.paste(tile, (x, y + gap))
            draw.rectangle(
                [pad + label_w - 3, y, width - pad + 1, y + fh + gap * 2 - 1], outline=mark, width=2
            )
            y += line_h
        y += pad
    _save_png(img, path)


def _save_png(img, path: str | Path) -> None:
    """PNG bytes, then one atomic write: a killed run never leaves a half image behind."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())

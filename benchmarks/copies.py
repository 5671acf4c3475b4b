"""The copy groups of `stanvid duplicates` on real encoded videos (run through `benchmarks/filters.py --copies`):
the demo corpus's clips (`stanvid demo --quick --out DEMO`: H.264, 32 x 32, 16 fps, one second each) are
concatenated with ffmpeg into longer originals (14 s; no clip in two of them), each copied five ways with ffmpeg, the folder is indexed with
the demo's model (DEMO/model, else DEMO/clip), and the groups found are scored against the copies made:

* reencoded: another bitrate and resolution (x1.5, CRF 35);   * trimmed: the first 30 % and last 10 % cut;
* scaled: half the resolution (x0.5 ... kept >= 16 px);         * cropped: the centre 90 % of each side;
* mirrored: flipped left to right.

A pair of files is predicted when `find_duplicates` puts them in one group; it is right when both hold the
same original. Precision is over every predicted pair; recall is per kind of copy (original - copy pairs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from itertools import combinations
from pathlib import Path

import numpy as np

CLIPS_PER_ORIGINAL = 14
ORIGINALS = 16
THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98)
KINDS = {
    "reencoded": ["-vf", "scale=48:48", "-crf", "35"],
    "trimmed": None,  # cut by time, see `_copy`
    "scaled": ["-vf", "scale=16:16"],
    "cropped": ["-vf", "crop=iw*0.9:ih*0.9,scale=32:32"],
    "mirrored": ["-vf", "hflip"],
}


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", *args], check=True)


def _originals(demo: Path, folder: Path) -> list[Path]:
    clips = sorted((demo / "data" / "videos").glob("*.mp4"))
    if len(clips) < ORIGINALS * CLIPS_PER_ORIGINAL:
        raise SystemExit(f"{demo}: {len(clips)} clips, {ORIGINALS * CLIPS_PER_ORIGINAL} needed")
    order = np.random.default_rng(0).permutation(
        len(clips)
    )  # no clip in two originals: they share no footage
    made = []
    for i in range(ORIGINALS):
        picks = [clips[j] for j in order[i * CLIPS_PER_ORIGINAL : (i + 1) * CLIPS_PER_ORIGINAL]]
        listing = folder / f"list-{i}.txt"
        listing.write_text("".join(f"file '{p}'\n" for p in picks))
        out = folder / "videos" / "originals" / f"o{i:02d}.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        _ffmpeg("-f", "concat", "-safe", "0", "-i", str(listing), "-c:v", "libx264", "-pix_fmt", "yuv420p",
                "-r", "16", str(out))  # fmt: skip
        listing.unlink()
        made.append(out)
    return made


def _copy(original: Path, kind: str, folder: Path) -> Path:
    out = folder / "videos" / "copies" / f"{original.stem}-{kind}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "trimmed":
        length = CLIPS_PER_ORIGINAL  # seconds
        _ffmpeg("-ss", f"{0.3 * length:.2f}", "-to", f"{0.9 * length:.2f}", "-i", str(original), "-c:v",
                "libx264", "-pix_fmt", "yuv420p", str(out))  # fmt: skip
    else:
        _ffmpeg("-i", str(original), *KINDS[kind], "-c:v", "libx264", "-pix_fmt", "yuv420p", str(out))
    return out


def copies_bench(demo: Path, work: Path, model_name: str | None = None) -> dict:
    from stanvid import build_index, open_index

    model = demo / "model" if (demo / "model" / "config.json").exists() else demo / "clip"
    if model_name is not None:
        model = demo / model_name
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is needed (apt-get install -y ffmpeg)")
    made = work / "origin.json"
    if not made.exists():  # the videos are made once; an index per model
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        originals = _originals(demo, work)
        origin = {f"originals/{o.name}": (o.stem, "original") for o in originals}
        for o in originals:
            for kind in KINDS:
                origin[f"copies/{_copy(o, kind, work).name}"] = (o.stem, kind)
        print(f"{len(originals)} originals of {CLIPS_PER_ORIGINAL} s and {len(origin) - len(originals)} copies "
              f"made in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        made.write_text(json.dumps(origin))
    origin = {k: tuple(v) for k, v in json.loads(made.read_text()).items()}
    out = work / f"idx-{model.name}"
    report = build_index(work / "videos", out, model, segment_seconds=2.0, num_workers=0,
                         progress=False, precision="fp32")  # fmt: skip
    print(f"model {model}\n{report.summary()}", flush=True)
    results = {"model": str(model), "originals": ORIGINALS, "thresholds": {}}
    with open_index(out, follow=None) as index:
        for threshold in THRESHOLDS:
            t1 = time.perf_counter()
            groups = index.duplicates(threshold)
            seconds = time.perf_counter() - t1
            results["thresholds"][threshold] = row = _score(groups, origin, seconds)
            print(f"threshold {threshold}: {json.dumps(row)}", flush=True)
    return results


def _score(groups: list, origin: dict, seconds: float) -> dict:
    predicted = {frozenset(p) for g in groups for p in combinations(g.files, 2)}
    right = {p for p in predicted if len({origin[f][0] for f in p}) == 1}
    row = {"seconds": round(seconds, 2), "groups": len(groups), "pairs": len(predicted),
           "precision": len(right) / max(1, len(predicted))}  # fmt: skip
    for kind in KINDS:
        wanted = {frozenset((o, c)) for c, (src, k) in origin.items() if k == kind
                  for o, (src2, k2) in origin.items() if k2 == "original" and src2 == src}  # fmt: skip
        row[f"recall_{kind}"] = len(wanted & predicted) / max(1, len(wanted))
    easy = [row[f"recall_{k}"] for k in ("reencoded", "trimmed", "scaled")]
    row["recall_reencoded_trimmed_scaled"] = float(np.mean(easy))
    return row

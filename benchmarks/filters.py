"""Filtered search, pages, copies and the recall the index records, on an archive of synthetic embeddings
(issue 35):

    nice python benchmarks/filters.py --segments 1000000 --work /tmp/r35-bench            # search + duplicates
    python benchmarks/filters.py --copies --demo /tmp/r35-demo --work /tmp/r35-copies       # copy groups

Search (`--segments N`): N / 100 stand-in files of 100 one-second segments (`benchmarks/archive.py`'s folder
and shards), file i modified at 2024-01-01 + i minutes, imported with `stanvid index --from-embeddings` (the
tuner's record printed). Vectors are `loose` by default: archive.py's clustered recipe with twice the noise
at each level (a file's centre at cosine ~0.45 to its topic, a segment ~0.67 to its file's centre), or
`--data clustered|isotropic`. Queries, one at a time, k = 10: near points (cosine 0.85 around random
indexed vectors, as the tuner draws them) and held-out vectors (files not indexed), recall@10 against an exact
scan of the shards; then the same near-point queries with a modified-time filter keeping 50 %, 10 %, 1 %
and 0.01 % of the segments (a window of consecutive files: their rows are a contiguous range of the shards,
scanned exactly for the truth), p50/p99 and recall@10. Then `VideoIndex.duplicates` over the whole index
(timed; the synthetic files hold no copies) and over the first 100k segments (a second index).

Copies (`--copies`): the demo corpus's videos (`stanvid demo --quick --out DEMO`), concatenated into
longer originals, each copied with ffmpeg five ways (re-encoded at another bitrate and resolution, trimmed,
scaled, cropped 10 %, mirrored), indexed with the demo's model; precision and recall of the copy groups
found at several thresholds, per kind of copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from archive import CHUNK, DIM, PER_FILE, TOPICS, Vectors, _unit, make_folder, write_shards  # noqa: E402

BASE_S = 1_704_067_200  # 2024-01-01T00:00:00Z
FRACTIONS = (0.5, 0.1, 0.01, 0.0001)


class LooseVectors(Vectors):
    """archive.py's clustered vectors with twice the noise at each level: less clustered."""

    def files(self, first: int, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, first])
        topic = self.topics[rng.integers(0, TOPICS, count)]
        centre = _unit(topic + 2 * rng.standard_normal((count, DIM), dtype=np.float32) / np.sqrt(DIM))
        noise = rng.standard_normal((count, PER_FILE, DIM), dtype=np.float32) * (1.0 / np.sqrt(DIM))
        return _unit((centre[:, None, :] + noise).reshape(-1, DIM))


def vectors_of(kind: str) -> Vectors:
    return LooseVectors("clustered") if kind == "loose" else Vectors(kind)


# ---------------------------------------------------------------------------------------------- building
def build(work: Path, segments: int, kind: str, model_dir: Path) -> tuple[Path, list, list[Path]]:
    """The folder, its shards and the imported index (reused when already there)."""
    from stanvid import build_index

    root, shards_dir, out = work / "videos", work / "emb", work / "idx"
    listing_file = work / "listing.json"
    if listing_file.exists() and (out / "index.sqlite").exists():
        listing = json.loads(listing_file.read_text())
        return out, listing, sorted(shards_dir.glob("*.npy"))
    files = segments // PER_FILE
    listing = make_folder(root, files)
    for i, (rel, _, _) in enumerate(listing):  # file i modified i minutes after 2024-01-01
        ns = (BASE_S + 60 * i) * 10**9
        os.utime(root / rel, ns=(ns, ns))
        listing[i] = (rel, (root / rel).stat().st_size, ns)
    header = {"model": str(model_dir), "model_fingerprint": fingerprint(model_dir), "dim": DIM,
              "segment_seconds": 1.0, "root": str(root)}  # fmt: skip
    shards = write_shards(shards_dir, listing, vectors_of(kind), header)
    t0 = time.perf_counter()
    report = build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False,
                         from_embeddings=str(shards_dir))  # fmt: skip
    print(f"import of {segments} segments: {time.perf_counter() - t0:.1f} s\n{report.summary()}", flush=True)
    listing_file.write_text(json.dumps(listing))
    return out, listing, shards


def fingerprint(model_dir: Path) -> str:
    from stanvid import load_model, model_fingerprint

    return model_fingerprint(load_model(str(model_dir)))


def tiny_model(work: Path) -> Path:
    """A ViT-B/32-sized text/vision config is not needed for vectors: a small 512-d model fingerprints them."""
    from stanvid import CLIPConfig, ModelConfig, TextConfig, VideoCLIP, VisionConfig

    target = work / "model"
    if not (target / "config.json").exists():
        import torch

        torch.manual_seed(0)
        cfg = ModelConfig(clip=CLIPConfig(embed_dim=DIM, vision=VisionConfig(width=64, layers=1, heads=2,
                          patch_size=16, image_size=32), text=TextConfig(width=64, layers=1, heads=2)),
                          temporal="meanP", num_frames=4)  # fmt: skip
        VideoCLIP(cfg).save_pretrained(target)
    return target


# ---------------------------------------------------------------------------------------------- truth
def exact_range(shards: list[Path], lo: int, hi: int, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) global row numbers of the exact top k among rows [lo, hi) of the shards (the second path)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    base = 0
    for npy in shards:
        matrix = np.load(npy, mmap_mode="r")
        a, b = max(lo - base, 0), min(hi - base, len(matrix))
        for first in range(a, b, CHUNK):
            block = np.asarray(matrix[first : min(b, first + CHUNK)])
            s = queries @ block.T  # (Q, n)
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            all_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            all_i = np.concatenate([best_i, part + base + first], axis=1)
            order = np.argsort(-all_s, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
        base += len(matrix)
    return best_i


def rows_of(shards: list[Path], picks: np.ndarray) -> np.ndarray:
    out, base = [], 0
    for npy in shards:
        matrix = np.load(npy, mmap_mode="r")
        mine = picks[(picks >= base) & (picks < base + len(matrix))] - base
        out.append(np.asarray(matrix[np.sort(mine)]))
        base += len(matrix)
    return np.concatenate(out)


def near_points(points: np.ndarray, rng: np.random.Generator, cosine: float = 0.85) -> np.ndarray:
    """Unit queries at `cosine` to each of `points`, in a random direction orthogonal to it (written here
    again, as the second path to the tuner's)."""
    noise = rng.standard_normal(points.shape)
    noise -= np.sum(noise * points, axis=1, keepdims=True) * points
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return _unit(cosine * points + np.sqrt(1 - cosine**2) * noise)


def measure(index, queries: np.ndarray, truth: np.ndarray, listing: list, filters: dict | None) -> dict:
    keys = [{(listing[i // PER_FILE][0], float(i % PER_FILE)) for i in row if i >= 0} for row in truth]
    times, hits, total, short = [], 0, 0, 0
    for q, t in zip(queries, keys, strict=True):
        t0 = time.perf_counter()
        res = index.search_embeddings(q[None], 10, filters=filters)[0]
        times.append(time.perf_counter() - t0)
        hits += len({(h.relpath, h.start) for h in res} & t)
        total += len(t)
        short += len(res) < len(t)
    ms = np.array(times[1:] or times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "recall_at_10": hits / max(1, total), "k_not_honoured": short}  # fmt: skip


def search_bench(out: Path, listing: list, shards: list[Path], kind: str, queries: int) -> dict:
    from stanvid import open_index

    n = len(listing) * PER_FILE
    rng = np.random.default_rng(11)
    near = near_points(rows_of(shards, np.sort(rng.choice(n, queries, replace=False))), rng)
    held = vectors_of(kind).files(len(listing) + 10, max(1, queries // PER_FILE + 1), 7)[:queries]
    results: dict = {}
    with open_index(out, follow=None) as index:
        print(index.describe(), flush=True)
        results["record"] = {k: v for k, v in index.meta["ann"].items() if "recall" in k or k in
                             ("nprobe", "rerank", "nlist", "filter_power", "filter_fraction")}  # fmt: skip
        for name, q in (("near points", near), ("held-out files", held)):
            truth = exact_range(shards, 0, n, q, 10)
            results[f"unfiltered, {name}"] = measure(index, q, truth, listing, None)
            print(f"unfiltered, {name}: {results[f'unfiltered, {name}']}", flush=True)
        for fraction in FRACTIONS:
            files = max(1, round(fraction * len(listing)))
            start = int(rng.integers(0, len(listing) - files + 1))
            spec = {"after": BASE_S + 60 * start, "before": BASE_S + 60 * (start + files)}
            truth = exact_range(shards, start * PER_FILE, (start + files) * PER_FILE, near, 10)
            got = measure(index, near, truth, listing, spec)
            got["segments_kept"] = files * PER_FILE
            results[f"filtered {fraction:.2%}"] = got
            print(f"filter keeping {fraction:.2%} ({files * PER_FILE} segments): {got}", flush=True)
    return results


def duplicates_bench(out: Path) -> dict:
    from stanvid import open_index

    with open_index(out, follow=None) as index:
        t0 = time.perf_counter()
        found = index.duplicates()
        seconds = time.perf_counter() - t0
        print(f"duplicates over {len(index)} segments: {seconds:.1f} s, {len(found)} groups", flush=True)
        return {"segments": len(index), "seconds": seconds, "groups": len(found)}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=1_000_000)
    ap.add_argument("--data", choices=("loose", "clustered", "isotropic"), default="loose")
    ap.add_argument("--work", type=Path, default=Path("/tmp/r35-bench"))
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--skip", nargs="*", default=[], choices=("search", "duplicates", "small"))
    ap.add_argument(
        "--copies", action="store_true", help="the copy-groups measurement instead (needs ffmpeg)"
    )
    ap.add_argument("--demo", type=Path, default=Path("/tmp/r35-demo"), help="`stanvid demo --quick` output")
    ap.add_argument("--demo-model", default=None, help="model folder inside DEMO (default: model, else clip)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    if args.copies:
        from copies import copies_bench

        results = copies_bench(args.demo, args.work, args.demo_model)
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        model_dir = tiny_model(args.work)
        out, listing, shards = build(args.work, args.segments, args.data, model_dir)
        results = {}
        if "search" not in args.skip:
            results["search"] = search_bench(out, listing, shards, args.data, args.queries)
        if "duplicates" not in args.skip:
            results["duplicates"] = duplicates_bench(out)
        if "small" not in args.skip and args.segments > 100_000:
            small, *_ = build(args.work / "100k", 100_000, args.data, model_dir)
            results["duplicates_100k"] = duplicates_bench(small)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""An archive on one machine: `stanvid index --from-embeddings` at 1M and 10M segments, then the updates and
searches of everyday use, each step a fresh process whose peak RSS is read from the kernel (wait4).

    python benchmarks/archive.py --segments 1000000 --data clustered --work /tmp/archive
    python benchmarks/archive.py --segments 1000000 --data isotropic --work /tmp/archive
    python benchmarks/archive.py --segments 10000000 --data clustered --work /tmp/archive10m

The folder holds N / 100 files of 100 one-second segments (files of a few bytes: an import never decodes them).
Their embeddings, 512-d float32 unit vectors, are written as `stanvid embed` shards of at most 1M rows
(.npy + .json with `size` and `mtime_ns`), generated a chunk at a time so no step holds them all:

* clustered: 1,000 topic centres uniform on the sphere; a file's centre is its topic plus Gaussian noise of the
  same norm (cosine to the topic ~0.71); a segment is its file's centre plus noise of half that norm (cosine to
  the file centre ~0.89). Segments of one video are alike, videos of one topic less so, as real archives are.
* isotropic: every vector uniform on the sphere, the worst case for any approximate index.

The model is ViT-B/32 with STAN (random weights, 512-d; its size is what matters for memory, not its weights).
Steps: import (`stanvid index --from-embeddings`), open + first search, `--queries` searches one at a time
(held-out vectors of the same distribution; p50/p99 of `VideoIndex.search_embeddings`, k = 10) with recall@10
against exact search over the shards, add one 10 s video (`stanvid index` encodes it), delete one file, and the
searches again (now through the delta and the deletions). Every figure is printed; `--json` keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from stanvid import create_model, model_fingerprint  # noqa: E402
from videogen import make_frames, write_video  # noqa: E402

DIM = 512
PER_FILE = 100
SHARD_ROWS = 1_000_000
CHUNK = 100_000
TOPICS = 1_000


# ---------------------------------------------------------------------------------------------- data
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Vectors:
    """The synthetic embeddings, generated file by file from seeds (so any row can be made again)."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        self.kind = kind
        self.topics = _unit(np.random.default_rng(seed).standard_normal((TOPICS, DIM)))

    def files(self, first: int, count: int, seed: int) -> np.ndarray:
        """(count * PER_FILE, D) vectors of files first .. first + count."""
        rng = np.random.default_rng([seed, first])
        if self.kind == "isotropic":
            return _unit(rng.standard_normal((count * PER_FILE, DIM), dtype=np.float32))
        topic = self.topics[rng.integers(0, TOPICS, count)]
        centre = _unit(topic + rng.standard_normal((count, DIM), dtype=np.float32) / np.sqrt(DIM))
        noise = rng.standard_normal((count, PER_FILE, DIM), dtype=np.float32) * (0.5 / np.sqrt(DIM))
        return _unit((centre[:, None, :] + noise).reshape(-1, DIM))


def make_folder(root: Path, files: int) -> list[tuple[str, int, int]]:
    out = []
    for i in range(files):
        rel = f"{i // 1000:04d}/{i:07d}.mp4"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(8, "little"))
        st = path.stat()
        out.append((rel, st.st_size, st.st_mtime_ns))
    return out


def write_shards(folder: Path, listing: list, vectors: Vectors, header: dict) -> list[Path]:
    """`stanvid embed`-format shards of at most SHARD_ROWS rows: the .npy written through a memory map."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = SHARD_ROWS // PER_FILE
    shards = []
    for s, first in enumerate(range(0, len(listing), per_shard)):
        files = listing[first : first + per_shard]
        npy = folder / f"shard-{s:05d}.npy"
        matrix = np.lib.format.open_memmap(
            npy, mode="w+", dtype=np.float32, shape=(len(files) * PER_FILE, DIM)
        )
        step = CHUNK // PER_FILE
        for k in range(0, len(files), step):
            matrix[k * PER_FILE : (k + step) * PER_FILE] = vectors.files(
                first + k, min(step, len(files) - k), 1
            )
        matrix.flush()
        del matrix
        with open(npy.with_suffix(".json"), "w") as f:
            f.write(json.dumps({**header, "vectors": npy.name})[:-1] + ', "rows": [')
            sep = "\n"
            for rel, size, mtime in files:
                for j in range(PER_FILE):
                    row = {
                        "path": rel,
                        "start": float(j),
                        "end": float(j + 1),
                        "size": size,
                        "mtime_ns": mtime,
                    }
                    f.write(sep + json.dumps(row))
                    sep = ",\n"
            f.write("\n]}\n")
        shards.append(npy)
    return shards


def exact_ranked(shards: list[Path], listing: list, queries: np.ndarray, k: int) -> list[list]:
    """The exact top-k (path, start) per query, best first, by scanning the shards (the second path)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    base = 0
    for npy in shards:
        matrix = np.load(npy, mmap_mode="r")
        for first in range(0, len(matrix), CHUNK):
            s = queries @ np.asarray(matrix[first : first + CHUNK]).T  # (Q, n)
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            all_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            all_i = np.concatenate([best_i, part + base + first], axis=1)
            order = np.argsort(-all_s, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
        base += len(matrix)
    return [[(listing[i // PER_FILE][0], float(i % PER_FILE)) for i in row] for row in best_i]


# ---------------------------------------------------------------------------------------------- processes
def run_child(argv: list[str]) -> dict:
    """Run a process: its wall time and output. Peak RSS is read inside each child (VmHWM of its own memory
    map): wait4's ru_maxrss counts the RSS this parent had when it forked the child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_f, err_f = proc.stdout, proc.stderr  # (its ru_maxrss would include this process's RSS at the fork)
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [
        threading.Thread(target=lambda f=f, k=k: chunks[k].append(f.read()))
        for f, k in ((out_f, "out"), (err_f, "err"))
    ]
    for r in readers:
        r.start()
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    out, err = "".join(chunks["out"]), "".join(chunks["err"])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "out": out, "err": err}


INDEX = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from pathlib import Path
    from stanvid import build_index  # torch, faiss, ...: what any `stanvid index` process imports
    imports = time.perf_counter() - t0
    report = build_index(sys.argv[1], sys.argv[2], sys.argv[3], segment_seconds=1.0, num_workers=0,
                         progress=False, from_embeddings=sys.argv[4] if len(sys.argv) > 4 else None)
    status = Path("/proc/self/status").read_text()  # VmHWM: the peak RSS of the whole process
    peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 2**20
    print(json.dumps({"summary": report.summary(), "timings": report.timings, "imports_s": imports,
                      "load_s": report.timings["model"], "rss_gib": peak}))
    """
)


def index_run(video_dir: Path, out: Path, model_dir: Path, *extra: str) -> dict:
    """One `stanvid index` run as the command makes it (`build_index` with the model's folder: loaded,
    fingerprinted through the cache, then the run): wall time, the child's own figures, peak RSS."""
    done = run_child([sys.executable, "-c", INDEX, str(video_dir), str(out), str(model_dir), *extra])
    result = json.loads(done["out"].strip().splitlines()[-1])
    return {"seconds": done["seconds"], **result}


SEARCH = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    t0 = time.perf_counter()
    from stanvid import VideoIndex, open_index  # torch, faiss: the cost of any stanvid process, timed apart
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = open_index(sys.argv[1])  # the vector index; the model loads on the first text query
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = index.search_embeddings(np.load(sys.argv[2])[:1], 10)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = index.search("a person walking a dog", k=10)
    t_text = time.perf_counter() - t0
    queries = np.load(sys.argv[2])
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        res = index.search_embeddings(q[None], 10)[0]
        times.append(time.perf_counter() - t)
        found.append([[h.relpath, h.start] for h in res])
    status = open("/proc/self/status").read().splitlines()
    peak = int(next(l for l in status if l.startswith("VmHWM")).split()[1]) / 2**20
    print(json.dumps({"import": t_import, "open": t_open, "first_search": t_first, "first_text_search": t_text, "times": times, "found": found, "segments": len(index),
                      "describe": index.describe(), "rss_gib": peak}))
    """
)


def searches(out: Path, queries_file: Path, truth: list[set]) -> dict:
    done = run_child([sys.executable, "-c", SEARCH, str(out), str(queries_file)])
    result = json.loads(done["out"].strip().splitlines()[-1])
    times = np.array(result["times"]) * 1e3
    recall = np.mean(
        [len({tuple(h) for h in f} & t) / 10 for f, t in zip(result["found"], truth, strict=True)]
    )
    return {
        "python_imports_s": result["import"],
        "open_s": result["open"],
        "first_search_s": result["first_search"],
        "first_text_search_s": result["first_text_search"],  # loads and fingerprints the model
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "recall_at_10": float(recall),
        "segments": result["segments"],
        "index": result["describe"],
        "rss_gib": result["rss_gib"],
    }


def report(step: dict, name: str) -> None:
    t = step["timings"]
    steps = ", ".join(f"{k} {v:.2f}" for k, v in t.items())
    print(f"{name}: {step['seconds']:.1f} s wall (Python imports {step['imports_s']:.2f} s; {steps} s; the "
          f"rest is the interpreter starting and exiting), peak RSS {step['rss_gib']:.2f} GiB\n"
          f"{step['summary']}", flush=True)  # fmt: skip


def disk_gib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=1_000_000)
    ap.add_argument("--data", choices=("clustered", "isotropic"), default="clustered")
    ap.add_argument(
        "--work", type=Path, required=True, help="scratch folder (needs ~3.1x the store: 6 GB at 1M)"
    )
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # the fingerprint cache starts empty, in the work folder (the import run fills it, as a first run does)
    os.environ["STANVID_CACHE"] = str(work / "cache")
    figures: dict = {
        "segments": args.segments,
        "data": args.data,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }

    model_dir = work / "model"
    model = create_model("ViT-B/32", num_frames=8)
    model.save_pretrained(model_dir)
    header = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model), "dim": DIM,
              "segment_seconds": 1.0, "root": str(work / "videos")}  # fmt: skip
    del model
    t = time.perf_counter()
    listing = make_folder(work / "videos", args.segments // PER_FILE)
    vectors = Vectors(args.data)
    shards = write_shards(work / "embeddings", listing, vectors, header)
    figures["generate_s"] = time.perf_counter() - t
    print(
        f"generated {args.segments} rows in {len(shards)} shards, {figures['generate_s']:.0f} s", flush=True
    )

    out = work / "idx"
    figures["import"] = index_run(work / "videos", out, model_dir, str(work / "embeddings"))
    figures["disk_gib"] = disk_gib(out)
    report(figures["import"], "import")
    print(f"disk {figures['disk_gib']:.2f} GiB", flush=True)

    held_out = Vectors(args.data).files(10**9, max(1, args.queries // PER_FILE + 1), 7)
    queries = held_out[np.random.default_rng(3).choice(len(held_out), args.queries, replace=False)]
    np.save(work / "queries.npy", queries)
    ranked = exact_ranked(shards, listing, queries, 10 + PER_FILE)  # room for the file deleted below
    truth = [set(row[:10]) for row in ranked]
    figures["search"] = searches(out, work / "queries.npy", truth)
    print("search:", json.dumps(figures["search"]), flush=True)

    (work / "videos" / "new").mkdir()
    write_video(
        work / "videos" / "new" / "added.mp4",
        make_frames(250, 240, 320, seed=1),
        fps=25,
        codec="h264",
        gop=25,
    )
    figures["add_one_video"] = index_run(work / "videos", out, model_dir)
    report(figures["add_one_video"], "add one video")

    gone = work / "videos" / listing[len(listing) // 2][0]
    gone.unlink()
    figures["delete_one_video"] = index_run(work / "videos", out, model_dir)
    report(figures["delete_one_video"], "delete one video")

    gone_rel = gone.relative_to(work / "videos").as_posix()
    truth = [set([p for p in row if p[0] != gone_rel][:10]) for row in ranked]  # the added video's are far
    figures["search_after_updates"] = searches(out, work / "queries.npy", truth)
    print("search after updates:", json.dumps(figures["search_after_updates"]), flush=True)
    figures["disk_gib_after"] = disk_gib(out)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

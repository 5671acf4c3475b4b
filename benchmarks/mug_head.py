"""Mug-STAN's head at MSR-VTT test size: time and peak memory of scoring every caption against every video.

    python benchmarks/mug_head.py                       # 1,000 captions x 1,000 videos x 32 tokens x 12 frames, D 512
    python benchmarks/mug_head.py --all-at-once         # also the unchunked head (needs ~10 GB on the CPU)
    python benchmarks/mug_head.py --device cuda

What is measured, each setting in a fresh process (so one setting's allocations do not hide another's):
`stanvid.training.evaluate.mug_scores` (what evaluation runs: the head block by block, `mug_block_size`'s default blocks
or `--chunk`) for each mode; optionally `mug_similarity` with no chunking (the whole (texts, videos, tokens,
frames) tensors at once, as the official evaluation computes it); and, for comparison, the cosine of pooled
embeddings that STAN's evaluation ranks. Then the per-query cost of the search re-rank: one 32-token query
against the per-frame vectors of the top-K candidates. Peak memory is the RSS growth over the call, sampled
every 0.5 ms (CPU), or `max_memory_allocated` growth (CUDA). Features are random: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from peak_memory import peak_bytes_during

from stanvid import MUG_MODES, mug_block_size, mug_scores, mug_similarity


def features(args, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.texts, args.tokens, args.dim, generator=g)
    lengths = torch.randint(6, args.tokens + 1, (args.texts,), generator=g)  # MSR-VTT captions: ~10-20 tokens
    mask = torch.arange(args.tokens)[None] < lengths[:, None]
    frames = torch.randn(args.videos, args.frames, args.dim, generator=g)
    return tokens.to(device), mask.to(device), frames.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one(args) -> dict:
    """One setting in this process: returns seconds and peak bytes."""
    torch.set_num_threads(args.threads)
    tokens, mask, frames = features(args)
    model = SimpleNamespace(config=SimpleNamespace(mug_mode=args.mode, mug_tau=100.0))
    if args.setting == "chunked":

        def run():
            return mug_scores(model, tokens, mask, frames, chunk=args.chunk, device=args.device)
    elif args.setting == "all-at-once":
        tokens, mask, frames = tokens.to(args.device), mask.to(args.device), frames.to(args.device)

        def run():
            with torch.inference_mode():
                out = mug_similarity(tokens, mask, frames, mode=args.mode).cpu()
            return out
    else:  # cosine of pooled embeddings, STAN's evaluation
        text = tokens[:, 0].to(args.device)
        video = frames.mean(1).to(args.device)

        def run():
            return (F.normalize(text, dim=-1) @ F.normalize(video, dim=-1).T).cpu()

    run_sync = lambda: (run(), sync(args.device))  # noqa: E731
    start = time.perf_counter()
    peak = peak_bytes_during(run_sync, args.device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak}


def rerank_cost(args) -> list[dict]:
    """One query against the per-frame vectors of K candidates (what `stanvid search` adds after FAISS)."""
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    rows = []
    for k in (100, 1000, 10000):
        query = torch.randn(1, args.tokens, args.dim, generator=g).to(args.device)
        mask = torch.zeros(1, args.tokens, dtype=torch.bool, device=args.device)
        mask[0, :12] = True
        frames = torch.randn(k, args.frames, args.dim, generator=g).to(args.device)
        with torch.inference_mode():
            mug_similarity(query, mask, frames)  # warm-up
            sync(args.device)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                mug_similarity(query, mask, frames)
                sync(args.device)
                times.append(time.perf_counter() - start)
        rows.append({"candidates": k, "ms": 1000 * sorted(times)[len(times) // 2]})
    return rows


def storage_cost(args, stored: int = 20000) -> list[dict]:
    """Reading K candidates' per-frame vectors from SQLite as `VideoIndex.segment_frames` does (same table and
    statement, a temporary database of ``stored`` segments), and decoding them."""
    import sqlite3
    import tempfile

    import numpy as np

    from stanvid import blob_frames, frames_blob

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(f"{tmp}/index.sqlite")
        conn.execute("CREATE TABLE segment_frames (segment_id INTEGER PRIMARY KEY, frames BLOB NOT NULL)")
        blob = frames_blob(rng.standard_normal((args.frames, args.dim), dtype=np.float32))
        conn.executemany("INSERT INTO segment_frames VALUES (?, ?)", ((i, blob) for i in range(stored)))
        conn.commit()
        for k in (100, 1000):
            times = []
            for _ in range(5):
                ids = rng.choice(stored, size=k, replace=False).tolist()
                start = time.perf_counter()
                marks = ",".join("?" * k)
                found = conn.execute(
                    f"SELECT segment_id, frames FROM segment_frames WHERE segment_id IN ({marks})", ids
                ).fetchall()
                np.stack([blob_frames(b, args.dim, where="bench") for _, b in found])
                times.append(time.perf_counter() - start)
            rows.append({"candidates": k, "ms": 1000 * sorted(times)[len(times) // 2]})
        conn.close()
    return rows


def spawn(args, setting: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--one", setting, "--mode", mode] + [
        f"--{k}={getattr(args, k)}"
        for k in ("texts", "videos", "tokens", "frames", "dim", "device", "threads")
    ]
    if args.chunk is not None:
        cmd.append(f"--chunk={args.chunk}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--videos", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--chunk", type=int, default=None, help="captions x videos per block (default: ~64 MB blocks)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--all-at-once", action="store_true", help="also the unchunked head (large memory)")
    p.add_argument("--modes", nargs="+", default=list(MUG_MODES), choices=MUG_MODES)
    p.add_argument("--one", choices=("chunked", "all-at-once", "cosine"), help=argparse.SUPPRESS)
    p.add_argument("--mode", default=MUG_MODES[0], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.setting = args.one
        print(json.dumps(one(args)))
        return
    block = args.chunk or mug_block_size(args.tokens, args.frames)
    four_d = args.texts * args.videos * args.tokens * args.frames * 4
    print(
        f"{args.texts} captions x {args.videos} videos x {args.tokens} tokens x {args.frames} frames, D {args.dim}, "
        f"{args.device}, {args.threads} threads; blocks of {block} x {block}; "
        f"one whole (texts, videos, tokens, frames) float32 tensor = {four_d / 2**30:.2f} GiB"
    )
    print(f"{'setting':<46} {'seconds':>8} {'peak MiB':>9}")
    settings = [("cosine", "cosine of pooled embeddings (STAN)", MUG_MODES[0])]
    for mode in args.modes:
        settings.append(("chunked", f"Mug head {mode}, chunked", mode))
        if args.all_at_once:
            settings.append(("all-at-once", f"Mug head {mode}, all at once", mode))
    for setting, label, mode in settings:
        r = spawn(args, setting, mode)
        print(f"{label:<46} {r['seconds']:>8.2f} {r['peak_bytes'] / 2**20:>9.0f}", flush=True)
    print("search re-rank, one 32-token query (12 real tokens) against K candidates' frames:")
    for row in rerank_cost(args):
        print(f"  K = {row['candidates']:>5}: {row['ms']:.2f} ms (median of 5)")
    print("reading their per-frame vectors from SQLite (20,000 stored segments, random ids):")
    for row in storage_cost(args):
        print(f"  K = {row['candidates']:>5}: {row['ms']:.2f} ms (median of 5)")


if __name__ == "__main__":
    main()

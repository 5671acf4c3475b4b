"""A running server follows `stanvid index`: how soon after a run commits the server answers from it, how long
each swap's load takes, and what the searches meanwhile see, on an archive built by `benchmarks/archive.py`.

    python benchmarks/archive.py --segments 1000000 --data clustered --work /tmp/archive --keep
    python benchmarks/follow.py --work /tmp/archive

`stanvid serve` runs as a process of its own (checking every `--follow` seconds, 0.5 by default as shipped);
threads here query it without pause: one asks `/api/info` (the generation it answers from), two search by text
(k = 10). Another thread reads the committed state from SQLite every 2 ms, so each commit's time is known to a
few milliseconds. Then `stanvid index` runs, each a process of its own, as a user runs them:

1. add one 10 s video (encoded: 10 one-second segments, one commit);
2. delete it;
3. import 9 % more segments from `stanvid embed` files (900 stand-in files of 100 segments each: the largest
   delta kept beside an untouched main file, the costliest swap of all);
4. delete one of those files (a small change on top of the large delta);
5. import 2 % more (past 10 %: the run merges, writes a new main file, and the server maps and hashes it).

For every generation committed: commit -> first answer from it (the first `/api/info` or search response
naming it), and the swap's load time as the server logged it; for every search, its latency, and the longest
one that ran while a swap was loading. Every figure is printed; `--json` keeps them.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import archive  # noqa: E402  (this folder: the archive's data generator)

from testkit import free_port  # noqa: E402
from videogen import make_frames, write_video  # noqa: E402


def get(base: str, path: str, **params) -> tuple[float, float, dict]:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=600) as r:
        body = json.loads(r.read())
    return t0, time.monotonic(), body


class Watch:
    """The committed state (generation, vector index record) read every 2 ms: (time, generation, ann) per change."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, check_same_thread=False)
        self.changes: list[tuple[float, int, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def state(self) -> tuple[int, str]:
        found = dict(self.conn.execute("SELECT key, value FROM meta WHERE key IN ('generation', 'ann')"))
        return int(found["generation"]), found["ann"]

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            now = self.state()
            if now != last:
                self.changes.append((time.monotonic(), *now))
                last = now
            time.sleep(0.002)


class Clients:
    """One thread asking /api/info, two searching, all recording (start, end, generation)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.info: list[tuple[float, float, int]] = []
        self.searches: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.ask_info, daemon=True)] + [
            threading.Thread(target=self.search, args=(q,), daemon=True)
            for q in ("a person walking a dog", "a car on a road at night")
        ]

    def ask_info(self) -> None:
        while not self.stop.is_set():
            t0, t1, body = get(self.base, "/api/info")
            self.info.append((t0, t1, body["generation"]))

    def search(self, text: str) -> None:
        while not self.stop.is_set():
            t0, t1, body = get(self.base, "/api/search", q=text, k=10)
            assert len(body["results"]) == 10
            self.searches.append((t0, t1, body["generation"]))


def stanvid_index(work: Path, *extra: str) -> float:
    """One `stanvid index` run, as a user types it; its wall time."""
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "stanvid.cli", "index", str(work / "videos"), "--model", str(work / "model"),
         "--out", str(work / "idx"), "--segment-seconds", "1", "--workers", "0", "--no-progress", *extra],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    print("   ", done.stdout.strip().splitlines()[0][:200], flush=True)
    return time.monotonic() - t0


def import_files(work: Path, name: str, first: int, count: int) -> Path:
    """`count` stand-in files under videos/NAME and a `stanvid embed` file of their 100 segments each."""
    header_text = (work / "embeddings" / "shard-00000.json").open().read(4096)
    header = json.loads(header_text.split(', "rows"')[0] + "}")
    header.pop("vectors", None)
    folder = work / f"extra-{name}"
    folder.mkdir(exist_ok=True)
    listing = []
    for i in range(first, first + count):
        path = work / "videos" / name / f"{i:07d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(8, "little"))
        st = path.stat()
        listing.append((path.relative_to(work / "videos").as_posix(), st.st_size, st.st_mtime_ns))
    vectors = archive.Vectors("clustered")
    np.save(folder / "rows.npy", vectors.files(first, count, 11))
    rows = [{"path": p, "start": float(j), "end": float(j + 1), "size": s, "mtime_ns": m}
            for p, s, m in listing for j in range(archive.PER_FILE)]  # fmt: skip
    (folder / "rows.json").write_text(json.dumps({**header, "vectors": "rows.npy", "rows": rows}))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work", type=Path, required=True, help="a work folder `benchmarks/archive.py --keep` left"
    )
    ap.add_argument("--follow", type=float, default=0.5, help="the server's check interval (default 0.5 s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.work
    port, log = free_port(), work / "serve.log"
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "stanvid.cli", "serve", str(work / "idx"), "--port", str(port),
             "--follow", str(args.follow)], stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    figures: dict = {"follow_s": args.follow}
    try:
        while True:
            try:
                segments = get(base, "/api/info")[2]["segments"]
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(log.read_text()[-3000:]) from None
                time.sleep(0.2)
        figures["server_start_s"] = time.monotonic() - t0
        print(f"server up in {figures['server_start_s']:.1f} s, {segments} segments", flush=True)
        watch, clients = Watch(work / "idx" / "index.sqlite"), Clients(base)
        watch.thread.start()
        for t in clients.threads:
            t.start()
        time.sleep(5)  # searches before any update, for their latency alone
        updates_from = time.monotonic()

        steps = []
        video = work / "videos" / "follow" / "added.mp4"
        video.parent.mkdir(exist_ok=True)
        write_video(video, make_frames(250, 240, 320, seed=3), fps=25, codec="h264", gop=25)
        steps.append(("add one 10 s video", stanvid_index(work)))
        video.unlink()
        steps.append(("delete it", stanvid_index(work)))
        n = 0.09 * segments // archive.PER_FILE
        extra = import_files(work, "import1", 10**7, int(n))
        steps.append(
            (
                f"import {int(n) * archive.PER_FILE} segments (9 %)",
                stanvid_index(work, "--from-embeddings", str(extra)),
            )
        )
        (work / "videos" / "import1" / f"{10**7:07d}.mp4").unlink()
        steps.append(("delete one imported file", stanvid_index(work)))
        extra = import_files(work, "import2", 2 * 10**7, int(0.02 * segments // archive.PER_FILE))
        kind = json.loads(watch.conn.execute("SELECT value FROM meta WHERE key = 'ann'").fetchone()[0])[
            "kind"
        ]
        label = "import 2 % more" + (" (past 10 %: a merge)" if kind != "flat" else "")
        steps.append((label, stanvid_index(work, "--from-embeddings", str(extra))))
        time.sleep(max(5, 4 * args.follow))  # the last swap, and searches after it
    finally:
        clients.stop.set()
        watch.stop.set()
        server.terminate()
        server.wait(timeout=60)
    figures.update(report(steps, watch.changes, clients, log.read_text(), updates_from))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def report(steps: list, changes: list, clients: Clients, log: str, updates_from: float) -> dict:
    """Commit -> first answer per generation, the swaps' load times, search latencies."""
    out: dict = {"steps": [{"step": s, "wall_s": w} for s, w in steps]}
    for s, w in steps:
        print(f"{s}: stanvid index {w:.1f} s wall", flush=True)
    answers = sorted(clients.info + clients.searches, key=lambda r: r[1])
    committed: dict[int, float] = {}
    for t, gen, _ in changes[1:]:  # the first is the state the server started from
        committed.setdefault(gen, t)
    swaps = re.findall(r"answering from generation (\d+)[^(]*\(.*?loaded in ([0-9.]+) s\)", log)
    load = {}
    for g, x in swaps:
        load.setdefault(int(g), float(x))  # the swap to each new generation (a later one is a new main file)
    delays, windows = [], []
    for gen, t in sorted(committed.items()):
        first = next((end for _, end, g in answers if g >= gen and end >= t), None)
        if first is not None:
            delays.append({"generation": gen, "commit_to_first_answer_s": first - t})
            if gen in load:  # the swap ended just before its first answer: its load ran the seconds before
                windows.append((first - load[gen], first))
    during = (
        np.array([b - a for a, b, _ in clients.searches if any(a < w1 and b > w0 for w0, w1 in windows)])
        * 1e3
    )
    refused = log.count("not following")
    lat = np.array([b - a for a, b, _ in clients.searches]) * 1e3
    before = np.array([b - a for a, b, _ in clients.searches if b < updates_from]) * 1e3
    out.update(
        commits=delays,
        swaps=[{"generation": int(g), "load_s": float(x)} for g, x in swaps],
        refused=refused,
        searches=len(lat),
        search_p50_ms=float(np.percentile(lat, 50)),
        search_p99_ms=float(np.percentile(lat, 99)),
        search_max_ms=float(lat.max()),
        search_before_updates_p50_ms=float(np.percentile(before, 50)),
        search_before_updates_p99_ms=float(np.percentile(before, 99)),
        searches_during_swaps=len(during),
        search_during_swaps_p50_ms=float(np.percentile(during, 50)) if len(during) else None,
        search_during_swaps_max_ms=float(during.max()) if len(during) else None,
    )
    for d in delays:
        print(
            f"generation {d['generation']}: first answer {d['commit_to_first_answer_s']:.2f} s after its commit"
        )
    for g, x in swaps:
        print(f"swap to generation {g}: loaded in {x} s (server log)")
    print(f"refused: {refused}; searches: {len(lat)}, p50 {out['search_p50_ms']:.1f} ms, p99 "
          f"{out['search_p99_ms']:.1f} ms, max {out['search_max_ms']:.1f} ms (before any update: p50 "
          f"{out['search_before_updates_p50_ms']:.1f}, p99 {out['search_before_updates_p99_ms']:.1f} ms)",
          flush=True)  # fmt: skip
    if len(during):
        print(f"searches that overlapped a swap's load: {len(during)}, p50 {np.percentile(during, 50):.1f} ms, "
              f"max {during.max():.1f} ms", flush=True)  # fmt: skip
    return out


if __name__ == "__main__":
    main()

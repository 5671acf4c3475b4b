"""A running server sees every update (issue 27): `stanvid serve` (real uvicorn, on a free port, a process of its
own) stays up while `stanvid index` (the CLI, in processes of its own) adds files, deletes some, and later
repairs a damaged vector file, under concurrent queries from several threads.

Checked: every response is a 200; every response names its generation and is that generation whole (all the
answers of one generation agree with each other and with `/api/info`'s counts of it, and each generation's
files are a state the runs went through: growing while files were added, without the deleted ones in one step,
then with the repair run's file); `k` is honoured; after the runs the new files are found, the deleted ones
are not, and the counts are the database's; a damaged new vector file is refused (the server logs why) while
the last good generation keeps answering. Waits poll with timeouts; nothing assumes a speed.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from indexkit import save_tiny_model, write_clip  # noqa: E402
from stanvid.cli import main as cli_main  # noqa: E402
from stanvid.search.index import DB_NAME  # noqa: E402
from testkit import free_port  # noqa: E402

TIMEOUT = 300.0  # generous: the machine may be loaded; nothing below depends on how fast it is
A = ["a0.mp4", "a1.mp4", "a2.mp4"]  # indexed before the server starts
B = ["new/b0.mp4", "new/b1.mp4", "new/b2.mp4"]  # added while it runs
D = ["a1.mp4", "new/b0.mp4", "new/b1.mp4"]  # then deleted
E = ["late/e0.mp4"]  # added by the run that repairs the damaged vector file
INDEX_ARGS = [
    "--segment-seconds",
    "1",
    "--index",
    "ivf",
    "--workers",
    "0",
    "--batch-size",
    "2",
    "--no-progress",
]


def committed(out: Path) -> tuple[int, int, int]:
    """(generation, files, segments) on disk, read with sqlite3 directly."""
    with contextlib.closing(sqlite3.connect(out / DB_NAME, timeout=60)) as conn:
        gen = int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
        files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        segments = conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
    return gen, files, segments


def get(base: str, path: str, **params) -> tuple[int, dict]:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def wait_for(condition, what: str, server: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if server is not None and server.poll() is not None:
            raise AssertionError(
                f"the server exited ({server.returncode}): {log.read_text()[-3000:] if log else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {TIMEOUT} s")
        time.sleep(0.05)


def run_index(root: Path, out: Path, model: Path) -> None:
    """`stanvid index` as a user runs it: the real command line, in a process of its own."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stanvid.cli",
            "index",
            str(root),
            "--model",
            str(model),
            "--out",
            str(out),
            *INDEX_ARGS,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]


class Clients:
    """Threads querying the server without pause, each response kept with its kind."""

    def __init__(self, base: str, like: int, threads: int = 3) -> None:
        self.base, self.like = base, like
        self.responses: list[tuple[str, int, dict, float]] = []
        self.rounds = [0] * threads
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, i: int) -> None:
        requests = [
            ("all", "/api/search", {"q": "a red square", "k": 200}),
            ("k3", "/api/search", {"q": "something moving", "k": 3}),
            ("files", "/api/search", {"q": "a red square", "k": 200, "group": "file"}),
            ("info", "/api/info", {}),
            ("like", f"/api/like/{self.like}", {"k": 200}),
        ]
        while not self._stop.is_set():
            for kind, path, params in requests[i % 5 :] + requests[: i % 5]:
                try:
                    status, body = get(self.base, path, **params)
                except OSError as exc:  # no answer at all: recorded, and fails the test
                    status, body = -1, {"error": repr(exc)}
                with self._lock:
                    self.responses.append((kind, status, body, time.monotonic()))
            self.rounds[i] += 1

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def wait_rounds(self, n: int = 1) -> None:
        """Until every thread finished `n` more rounds of requests."""
        start = list(self.rounds)
        wait_for(lambda: all(r >= s + n for r, s in zip(self.rounds, start, strict=True)), "queried")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=TIMEOUT)


def damage_a_new_vector_file(out: Path) -> int:
    """A committed state whose vector index file does not match its record (as if its bytes were damaged on
    disk after a merge wrote it): a new file, one byte flipped, recorded with the good file's hash, and a
    newer generation. Returns that generation."""
    with contextlib.closing(sqlite3.connect(out / DB_NAME, timeout=60, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        good = out / meta["ann"]["file"]
        damaged = out / "vectors-999.faiss"
        data = bytearray(good.read_bytes())
        data[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(data))
        generation = meta["generation"] + 1
        conn.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            [
                (json.dumps({**meta["ann"], "file": damaged.name}), "ann"),
                (json.dumps(generation), "generation"),
            ],
        )
        conn.execute("COMMIT")
    return generation


def test_a_running_server_follows_every_update_under_concurrent_queries(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    root, out, log = tmp_path / "videos", tmp_path / "idx", tmp_path / "serve.log"
    clip = {name: (20, seed) for seed, name in enumerate(A + B + E, start=1)}  # 2 s each: 2 segments
    for name in A:
        write_clip(root / name, *clip[name])
    assert cli_main(["index", str(root), "--model", str(model), "--out", str(out), *INDEX_ARGS]) == 0
    g0 = committed(out)[0]

    base = f"http://127.0.0.1:{(port := free_port())}"
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "stanvid.cli", "serve", str(out), "--port", str(port), "--follow", "0.1"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _up(base), "serving", server, log)
        status, first = get(base, "/api/search", q="x", k=200)
        like = next(h["id"] for h in first["results"] if h["path"] == "a0.mp4")
        with Clients(base, like) as clients:
            clients.wait_rounds()  # answers of the first generation
            for name in B:  # a run adds files (committed two clips at a time: several generations)
                write_clip(root / name, *clip[name])
            run_index(root, out, model)
            g1 = committed(out)[0]
            wait_for(lambda: get(base, "/api/info")[1]["generation"] == g1, "at the added files", server, log)
            clients.wait_rounds()

            for name in D:  # a run deletes some
                (root / name).unlink()
            run_index(root, out, model)
            g2 = committed(out)[0]
            wait_for(
                lambda: get(base, "/api/info")[1]["generation"] == g2, "without the deleted", server, log
            )
            clients.wait_rounds()

            refused = damage_a_new_vector_file(out)
            wait_for(lambda: "not following the update" in log.read_text(), "refused", server, log)
            clients.wait_rounds()  # queries keep being answered, from the last good generation
            for name in E:  # the next run sees the damage and writes a good file
                write_clip(root / name, *clip[name])
            run_index(root, out, model)
            g3 = committed(out)[0]
            wait_for(lambda: get(base, "/api/info")[1]["generation"] == g3, "repaired", server, log)
            clients.wait_rounds()
        final = get(base, "/api/search", q="a red square", k=200)[1]
        info = get(base, "/api/info")[1]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    text = log.read_text()
    assert f"generation {refused}" in text and "vectors-999.faiss" in text  # why it was refused
    responses = clients.responses
    assert [r[:3] for r in responses if r[1] != 200] == []
    by_gen = check_generations(responses)
    assert refused not in by_gen  # never answered from the damaged state
    universe = set(A + B + E)
    assert by_gen[g0]["files"] == set(A)
    assert by_gen[g1]["files"] == set(A + B)
    assert by_gen[g2]["files"] == set(A + B) - set(D)
    assert by_gen[g3]["files"] == (set(A + B) - set(D)) | set(E)
    for g, seen in by_gen.items():  # each generation a state the runs went through
        if g <= g1:
            assert set(A) <= seen["files"] <= set(A + B)
            earlier = [by_gen[h]["files"] for h in by_gen if h < g]
            assert all(e <= seen["files"] for e in earlier)  # files only added
        elif g <= g2:
            assert seen["files"] == set(A + B) - set(D)  # the deletions, in one step
        else:
            assert seen["files"] == (set(A + B) - set(D)) | set(E) and seen["files"] <= universe
    # after the runs: new files found, deleted ones gone, k honoured, the counts the database's
    assert final["generation"] == info["generation"] == g3
    gen, files, segments = committed(out)
    assert (info["generation"], info["files"], info["segments"]) == (gen, files, segments)
    assert len(final["results"]) == segments == 2 * files
    assert {h["path"] for h in final["results"]} == (set(A + B) - set(D)) | set(E)


def _up(base: str) -> bool:
    try:
        return get(base, "/api/info")[0] == 200
    except OSError:
        return False


def check_generations(responses: list[tuple[str, int, dict, float]]) -> dict[int, dict]:
    """Per generation: the files and segment ids its answers hold, after checking that all the answers of
    that generation agree (the same segments from every search and "more like this" returning everything,
    the same files grouped, `/api/info`'s counts, k = 3 honoured)."""
    seen: dict[int, dict] = defaultdict(lambda: {"ids": None, "files": None, "info": set(), "k3": set()})
    for kind, _, body, _ in responses:
        g = body["generation"]
        entry = seen[g]
        if kind in ("all", "like"):
            ids = frozenset(h["id"] for h in body["results"])
            files = {h["path"] for h in body["results"]}
            assert entry["ids"] in (None, ids), f"generation {g}: two answers with different segments"
            assert entry["files"] in (None, files)
            entry["ids"], entry["files"] = ids, files
        elif kind == "files":
            files = {h["path"] for h in body["results"]}
            assert entry["files"] in (None, files), f"generation {g}: grouped files differ"
            entry["files"] = files
            entry.setdefault("timeline", set()).add(sum(len(h["timeline"]) for h in body["results"]))
        elif kind == "info":
            entry["info"].add((body["files"], body["segments"]))
        else:
            entry["k3"].add(len(body["results"]))
    for g, entry in seen.items():
        assert len(entry["info"]) <= 1, f"generation {g}: two different counts {entry['info']}"
        if entry["ids"] is not None:
            segments = len(entry["ids"])
            assert entry["info"] <= {(len(entry["files"]), segments)}, f"generation {g}: info disagrees"
            assert entry.get("timeline", {segments}) == {segments}
            assert entry["k3"] <= {min(3, segments)}
        if entry["files"] is None:  # a generation only /api/info saw (a moment's): its counts agree at least
            entry["files"] = set()
    return {g: e for g, e in seen.items() if e["files"] or e["ids"]}

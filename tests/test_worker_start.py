"""Loader workers do not depend on what the parent process did before they started (issue: PyAV 18.1.1 deadlocked
in forked workers once the parent had converted a frame), and a stopped command leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stanvid.data.loader import worker_context
from testkit import stop_leaves_nothing
from videogen import write_video

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

# Decodes a video (and converts a frame) in the parent, then reads the same video in a loader worker: with a
# forked worker and PyAV 18.1.1 the worker's first conversion waits forever.
PARENT_THEN_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np, av, torch
    from stanvid import read_frames
    from stanvid.data.loader import build_loader
    import forkcheck_data

    if __name__ == "__main__":  # workers start from a clean process, which imports this script again
        path = sys.argv[1]
        parent = read_frames(path, np.arange(4))  # the parent decodes and converts frames first
        av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24").reformat(
            width=32, height=32, format="yuv420p")
        loader = build_loader(forkcheck_data.Frames(path), 1, num_workers=2, pin_memory=False)
        got = [batch for batch in loader]
        assert len(got) == 2, len(got)
        assert torch.equal(got[0]["frames"][0], parent), "the worker decoded other frames than the parent"
        print("ok", av.__version__, loader.multiprocessing_context.get_start_method())
    """
)

DATASET = textwrap.dedent(
    """
    import numpy as np
    import torch
    from stanvid import read_frames

    class Frames(torch.utils.data.Dataset):
        def __init__(self, path):
            self.path = path

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"frames": read_frames(self.path, np.arange(4))}
    """
)


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(SRC), env.get("PYTHONPATH", "")])
    env.pop("STANVID_WORKER_START", None)
    return env


def test_workers_never_fork_from_the_model_process():
    method = worker_context().get_start_method()
    assert method in ("forkserver", "spawn")


def test_parent_decodes_then_worker_decodes_without_hanging(tmp_path):
    video = write_video(tmp_path / "clip.mp4", (f for f in _frames()), fps=10)
    (tmp_path / "forkcheck_data.py").write_text(DATASET)
    script = tmp_path / "parent_then_worker.py"
    script.write_text(PARENT_THEN_WORKER)
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(video)],
            env=_env(tmp_path),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(
            "a loader worker hung decoding after the parent had decoded (fork-inherited decoder state?): "
            f"{hung.stdout!r} {hung.stderr!r}"
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout


def _frames():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(8):
        yield rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)


# --- a stopped run leaves nothing behind ----------------------------------------------------------------------


LONG_LOADER = textwrap.dedent(
    """
    import sys, time
    import forkcheck_data
    from stanvid.cli import install_stop_handlers
    from stanvid.data.loader import build_loader

    if __name__ == "__main__":
        install_stop_handlers()
        loader = build_loader(forkcheck_data.Frames(sys.argv[1]), 1, num_workers=2, pin_memory=False)
        try:
            started = False
            while True:
                for _ in loader:
                    if not started:  # both workers are up once a batch came back (none is mid-launch)
                        print("started", flush=True)
                        started = True
                    time.sleep(0.05)
        except KeyboardInterrupt:  # as stanvid.cli.main answers Ctrl-C
            sys.exit(130)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list child processes")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_loader_leaves_no_worker(tmp_path, sig):
    video = write_video(tmp_path / "clip.mp4", (f for f in _frames()), fps=10)
    (tmp_path / "forkcheck_data.py").write_text(DATASET)
    script = tmp_path / "long_loader.py"
    script.write_text(LONG_LOADER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(video)],
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("started")
        # SIGKILL runs no exit handler: the workers' watch on their owner ends them (and then the forkserver)
        code = stop_leaves_nothing(proc, sig, children=3)  # the forkserver and two workers
        assert code == (-sig if sig == signal.SIGKILL else 128 + sig), (code, proc.stderr.read()[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()

"""Plain helpers the tests share (imported as `from testkit import ...`; `tests/` is on the path through
pyproject's `pythonpath`): the tiny model configuration every fast test builds on, and a free TCP port."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import torch

from stanvid.models.config import CLIPConfig, ModelConfig, STANConfig, TextConfig, VisionConfig
from stanvid.models.video_clip import VideoCLIP


def tiny_config(temporal: str = "stan", **kw) -> ModelConfig:
    """A few-layer CLIP whose sizes differ from every shared reference (nothing may depend on those)."""
    vision = VisionConfig(
        width=48, layers=kw.pop("layers", 3), heads=3, patch_size=8, image_size=kw.pop("image", 24)
    )
    text = TextConfig(width=32, layers=2, heads=2, context_length=16, vocab_size=kw.pop("vocab", 49408))
    stan = STANConfig(
        depth=kw.pop("depth", 2), time_module=kw.pop("time_module", "selfattn"), **kw.pop("stan", {})
    )
    return ModelConfig(
        clip=CLIPConfig(embed_dim=24, vision=vision, text=text),
        temporal=temporal,
        stan=stan,
        num_frames=kw.pop("frames", 5),
        **kw,
    )


def tiny_model(temporal: str = "stan", seed: int = 0, **kw) -> VideoCLIP:
    """A `VideoCLIP` of `tiny_config(temporal, **kw)`, seeded, in eval mode (also the `tiny_model` fixture)."""
    torch.manual_seed(seed)
    return VideoCLIP(tiny_config(temporal, **kw)).eval()


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous or a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid`, from /proc (zombies count as gone)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive_processes(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def stop_leaves_nothing(proc: subprocess.Popen, sig: signal.Signals, children: int, wait: float = 120) -> int:
    """Wait until `proc` has `children` live descendants (its worker processes), send it `sig`, and check that it
    exits and that none of them outlives it; returns its exit code."""
    deadline = time.monotonic() + wait
    found: set[int] = set()
    while time.monotonic() < deadline and len(found) < children and proc.poll() is None:
        time.sleep(0.2)
        found = descendants(proc.pid)
    assert len(found) >= children, f"expected {children} worker processes, found {found} (exit {proc.poll()})"
    time.sleep(1.0)  # the last worker seen is forked; let its parent finish starting it before the signal
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    deadline = time.monotonic() + 15
    while alive_processes(found) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive_processes(found), f"processes left behind after {sig.name}: {alive_processes(found)}"
    return code


def one_line_error(capsys, argv: list[str], *names: str) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, naming each of `names`."""
    from stanvid.cli import main as cli_main

    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, err
    return err

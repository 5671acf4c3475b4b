"""Shared fixtures: where the parity references live, tiny models built in seconds, one torch thread, a free
port. Plain helpers (tiny_config, ...) live in `testkit`."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import testkit


def parity_root() -> Path:
    """`../shared/parity` next to the repository (CI has it there), or $STANVID_PARITY_DIR."""
    env = os.environ.get("STANVID_PARITY_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "parity"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """$STANVID_CACHE in a folder of this session (downloads, the fingerprint cache): tests never read or
    write the user's cache, and the processes they start inherit the same folder."""
    before = os.environ.get("STANVID_CACHE")
    os.environ["STANVID_CACHE"] = str(tmp_path_factory.mktemp("stanvid-cache"))
    yield Path(os.environ["STANVID_CACHE"])
    if before is None:
        os.environ.pop("STANVID_CACHE", None)
    else:
        os.environ["STANVID_CACHE"] = before


@pytest.fixture
def parity():
    """Path of one parity reference; the test skips, with the reason, when it is absent."""

    def get(name: str) -> Path:
        path = parity_root() / name
        if not path.exists():
            pytest.skip(
                f"parity reference {path} is missing (set STANVID_PARITY_DIR to the shared parity folder)"
            )
        return path

    return get


@pytest.fixture
def tiny_model():
    """`testkit.tiny_model`: a tiny seeded `VideoCLIP` in eval mode, `tiny_model(temporal, seed, **config)`."""
    return testkit.tiny_model


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; a loaded 2-core machine oversubscribed with two is 100x slower.
    Files of tiny-model tests use it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def free_port() -> int:
    """A free TCP port (`testkit.free_port`), for one process group or server per test."""
    return testkit.free_port()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """`stanvid demo --quick --mug --seed 1`, run once per test session (about 20 s): its folder and what it printed.

    Everything that needs a trained STAN model and the demo's corpus (the demo's own end-to-end test, the
    query and zero-shot classification tests) shares this one run."""
    from stanvid.cli import main

    out = tmp_path_factory.mktemp("demo-quick") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # one thread, as tiny models are run here (`one_thread`): two spin against each other on a loaded machine
        args = [
            "demo",
            "--quick",
            "--mug",
            "--out",
            str(out),
            "--seed",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ]
        code = main(args)
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local folder standing in for the Hugging Face hub, no network: `HfApi` uploads write into
    `hub/<owner>/<name>/`, `hf_hub_download` copies from there into a cache folder (a file the repository does not
    have raises the client's EntryNotFoundError, as the real one does). Returns `.root` (the hub folder) and
    `.requested` ((repo, file) of every download, in order)."""
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is an optional extra")
    from huggingface_hub import errors

    root, cache = tmp_path / "hub", tmp_path / "hub-cache"
    requested: list[tuple[str, str]] = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **_):
            (root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, **_):
            for op in operations:
                data = op.path_or_fileobj
                dest = root / repo_id / op.path_in_repo
                dest.write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())

    def download(repo_id, filename, **_):
        requested.append((repo_id, filename))
        if not (root / repo_id).is_dir():
            raise OSError(f"repository {repo_id} not found")
        src = root / repo_id / filename
        if not src.is_file():
            raise errors.EntryNotFoundError(f"{filename} is not in {repo_id}")
        dest = cache / repo_id / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    root.mkdir()
    return SimpleNamespace(root=root, requested=requested)

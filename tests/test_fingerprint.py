"""Loading a model's weights once (read into tensors of their own, assigned to a model built on the meta
device) against the old path (a model built and initialised, then copied into), and the fingerprint cache:
the same digest as hashing the weights, never a stale one after the file changed, and a corrupt cache file
ignored."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

import stanvid
from indexkit import index_model
from stanvid import fileio
from stanvid.checkpoints import convert
from stanvid.checkpoints.load import load_model_and_weights
from stanvid.errors import CheckpointError
from stanvid.search.index import identity
from stanvid.search.index.identity import FINGERPRINT_CACHE, load_fingerprinted, model_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


def _copied(model: stanvid.VideoCLIP) -> stanvid.VideoCLIP:
    """The second path: the model built the usual way (initialised) and the weights copied in."""
    fresh = stanvid.VideoCLIP(model.config)
    convert.load_converted(fresh, model.state_dict(), source="test")
    return fresh.eval()


def test_weights_assigned_once_match_the_copied_path(tmp_path):
    saved = index_model(seed=3)
    saved.save_pretrained(tmp_path / "m")
    loaded, weights = load_model_and_weights(tmp_path / "m")
    reference = _copied(saved)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    pointers = [p.untyped_storage().data_ptr() for p in loaded.parameters()]
    assert len(set(pointers)) == len(pointers)  # no parameter aliases another (or one mapped file)
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters()) and not loaded.training
    video = torch.randn(2, 4, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_video(video), reference.encode_video(video), rtol=0, atol=0)
    assert model_fingerprint(loaded) == model_fingerprint(saved)
    # freshly written: exact, but too recent for its identity to be trusted
    assert weights is None
    os.truncate(tmp_path / "m" / "model.safetensors", 0)  # nothing of the file is mapped: no SIGBUS
    torch.testing.assert_close(loaded.encode_video(video), reference.encode_video(video), rtol=0, atol=0)


def test_cast_or_initialised_weights_are_not_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "SETTLE_SECONDS", 0.0)
    saved = index_model(seed=4)
    saved.save_pretrained(tmp_path / "m")
    assert load_model_and_weights(tmp_path / "m")[1] is not None  # as saved: the file is the state dict
    assert load_model_and_weights(tmp_path / "m", temporal="meanP")[1] is None  # temporal weights dropped
    half = {k: v.half() for k, v in saved.state_dict().items()}
    save_file(half, tmp_path / "m" / "model.safetensors")
    model, weights = load_model_and_weights(tmp_path / "m")
    assert weights is None  # cast to float32 on the way in
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, half[name].float()), name


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-7], "bytes|ended"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "header of"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "not JSON"),
    ],
)
def test_damaged_safetensors_named(tmp_path, damage, message):
    index_model().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: cannot read safetensors.*({message})"):
        stanvid.load_model(tmp_path / "m")


def test_overlapping_tensors_refused(tmp_path):
    body = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    ).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(12))
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        stanvid.load_model(path)


# ---------------------------------------------------------------------------------------------- the cache
SETTLE = 0.05


def _settle() -> None:
    time.sleep(SETTLE * 1.5)


@pytest.fixture
def settled(monkeypatch, tmp_path):
    """A short settling time (the real one is 2 s), and a cache folder of the test's own."""
    monkeypatch.setattr(fileio, "SETTLE_SECONDS", SETTLE)
    monkeypatch.setenv("STANVID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / FINGERPRINT_CACHE


def _no_hashing(monkeypatch):
    def refuse(model):
        raise AssertionError("the weights were hashed")

    monkeypatch.setattr(identity, "model_fingerprint", refuse)


def test_cache_gives_the_hashed_fingerprint(tmp_path, monkeypatch, settled):
    saved = index_model(seed=5)
    saved.save_pretrained(tmp_path / "m")
    _, fresh = load_fingerprinted(str(tmp_path / "m"), {})
    assert fresh == model_fingerprint(saved) and not settled.exists()  # too recent to be cached
    _settle()
    _, first = load_fingerprinted(str(tmp_path / "m"), {})
    assert first == model_fingerprint(saved) and settled.exists()
    with monkeypatch.context() as m:
        _no_hashing(m)
        _, cached = load_fingerprinted(str(tmp_path / "m"), {})
    assert cached == first
    # an override the fingerprint covers is another entry, not this one
    _, frames = load_fingerprinted(str(tmp_path / "m"), {"num_frames": 8})
    assert frames == model_fingerprint(stanvid.load_model(tmp_path / "m", num_frames=8)) != first


def test_stale_entry_not_used_after_the_file_changes(tmp_path, monkeypatch, settled):
    first, second = index_model(seed=6), index_model(seed=7)
    first.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    _settle()
    assert load_fingerprinted(str(tmp_path / "m"), {})[1] == model_fingerprint(first)
    # rewritten in place, same size, its mtime set back: only the ctime tells
    before = weights.stat()
    second.save_pretrained(tmp_path / "other")
    raw = (tmp_path / "other" / "model.safetensors").read_bytes()
    assert len(raw) == before.st_size
    with open(weights, "r+b") as f:
        f.write(raw)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    _settle()
    assert load_fingerprinted(str(tmp_path / "m"), {})[1] == model_fingerprint(second)
    # replaced by a new file (save_pretrained renames one into place)
    first.save_pretrained(tmp_path / "m")
    _settle()
    assert load_fingerprinted(str(tmp_path / "m"), {})[1] == model_fingerprint(first)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"version": 1, "entries": []}', "entries with bad values"],
)
def test_corrupt_cache_file_ignored(tmp_path, settled, content):
    saved = index_model(seed=8)
    saved.save_pretrained(tmp_path / "m")
    _settle()
    load_fingerprinted(str(tmp_path / "m"), {})
    if content == "entries with bad values":
        entries = json.loads(settled.read_text())["entries"]
        content = json.dumps({"version": 1, "entries": {k: "f" * 63 + "g" for k in entries}}).encode()
    settled.write_bytes(content)
    assert load_fingerprinted(str(tmp_path / "m"), {})[1] == model_fingerprint(saved)
    assert model_fingerprint(saved) in json.loads(settled.read_text())["entries"].values()  # written anew


def test_unwritable_cache_is_only_not_kept(tmp_path, monkeypatch, settled):
    saved = index_model(seed=9)
    saved.save_pretrained(tmp_path / "m")
    settled.parent.parent.joinpath("blocker").write_text("a file where the cache folder would be")
    monkeypatch.setenv("STANVID_CACHE", str(settled.parent.parent / "blocker"))
    _settle()
    assert load_fingerprinted(str(tmp_path / "m"), {})[1] == model_fingerprint(saved)

"""stanvid.fileio: an atomic write leaves the new content or the old one, and never a temporary file."""

from __future__ import annotations

import os

import pytest
import torch

from stanvid import fileio
from stanvid.fileio import atomic_save, atomic_write_bytes, atomic_write_text


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_replace_the_file_and_leave_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second — ü\n")
    assert target.read_text(encoding="utf-8") == "second — ü\n"
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01\xff")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01\xff"
    atomic_save({"w": torch.arange(5)}, tmp_path / "state.pt")
    assert torch.equal(torch.load(tmp_path / "state.pt", weights_only=True)["w"], torch.arange(5))
    assert _listing(tmp_path) == ["blob.bin", "state.pt", "sub"]
    assert _listing(tmp_path / "sub") == ["notes.txt"]


def test_a_failing_save_keeps_the_old_content_and_removes_its_temporary_file(tmp_path):
    target = tmp_path / "state.pt"
    atomic_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises for a lambda)
        atomic_save({"w": torch.zeros(3), "f": lambda: None}, target)
    assert target.read_bytes() == before
    assert _listing(tmp_path) == ["state.pt"]


def test_an_interrupt_mid_write_or_a_failed_rename_loses_nothing(tmp_path, monkeypatch):
    target = tmp_path / "index.json"
    atomic_write_text(target, '{"old": true}')

    def half_then_interrupt(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_interrupt)  # fileio imports torch when it saves
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"new": 1}, target)
    assert target.read_text() == '{"old": true}' and _listing(tmp_path) == ["index.json"]

    def refuse(src, dst):
        raise PermissionError(f"cannot replace {dst}")

    monkeypatch.setattr(fileio.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == '{"old": true}' and _listing(tmp_path) == ["index.json"]


@pytest.mark.skipif(os.name != "posix", reason="folders are fsynced where the platform can open them")
def test_the_file_and_then_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", record)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert len(synced) == 2
    if isinstance(synced[1], str):
        assert synced[1] == os.path.realpath(tmp_path)


def test_a_stream_written_in_pieces_arrives_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model.bin"
    fileio.atomic_write_stream(target, lambda f: [f.write(bytes([i]) * 1000) for i in range(3)])
    assert target.read_bytes() == b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000

    def cut_off(f):
        f.write(b"the first megabyte")
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        fileio.atomic_write_stream(target, cut_off)
    assert target.read_bytes()[:1000] == b"\x00" * 1000 and _listing(tmp_path) == ["model.bin"]


def test_atomic_path_renames_what_the_block_wrote_and_only_when_it_succeeds(tmp_path):
    target = tmp_path / "out" / "video.mp4"
    with fileio.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # nothing is visible before the block ends
        tmp.write_bytes(b"new video")
    assert target.read_bytes() == b"new video" and _listing(target.parent) == ["video.mp4"]

    with pytest.raises(RuntimeError, match="encoder failed"), fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"half a video")
        raise RuntimeError("encoder failed")
    assert target.read_bytes() == b"new video" and _listing(target.parent) == ["video.mp4"]


def test_atomic_path_takes_a_temporary_name_in_the_same_folder_only(tmp_path):
    target = tmp_path / "a.mp4"
    with fileio.atomic_path(target, temp_name=".a.123.partial.mp4") as tmp:
        assert tmp == tmp_path / ".a.123.partial.mp4"
        tmp.write_bytes(b"x")
    assert _listing(tmp_path) == ["a.mp4"]
    with pytest.raises(ValueError, match="file name"), fileio.atomic_path(target, temp_name="sub/.a.tmp"):
        pass
    with pytest.raises(FileNotFoundError), fileio.atomic_path(target):
        pass  # the block wrote nothing: an error, and the old file stays
    assert target.read_bytes() == b"x" and _listing(tmp_path) == ["a.mp4"]


def test_settled_identity_waits_for_the_clock(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    st = path.stat()
    assert fileio.settled_identity(st) is None  # changed just now: a change in the same tick would not show
    later = max(st.st_mtime_ns, st.st_ctime_ns) + int(fileio.SETTLE_SECONDS * 1e9)
    assert fileio.settled_identity(st, later) == [st.st_dev, st.st_ino, 1, st.st_mtime_ns, st.st_ctime_ns]

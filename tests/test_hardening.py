"""Hostile files, damaged indexes and a server that only ever serves what it indexed (issue 12), each case made
here: links swapped under a running app, names that are not UTF-8, vector and SQLite files truncated, foreign
or garbage, a video whose one timestamp lies 10^10 frames away, two runs on one index.

Every case asserts the outcome a user sees: no traceback, one line naming the culprit, nothing committed lost,
and never a byte of a file outside the indexed folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from indexkit import rows, save_tiny_model, write_clip  # noqa: E402
from stanvid.cli import main as cli_main  # noqa: E402
from stanvid.locking import LockHeldError, exclusive_lock  # noqa: E402
from stanvid.search.index import (  # noqa: E402
    DB_NAME,
    LOCK_NAME,
    VideoIndexError,
    build_index,
    open_index,
)
from stanvid.search.server.app import create_app  # noqa: E402
from testkit import one_line_error  # noqa: E402

VIDEOS = {"a.mp4": (20, 1), "sub/b.mkv": (15, 2), "c.mp4": (12, 3)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def make_videos(root: Path, videos: dict = VIDEOS) -> Path:
    for name, (frames, seed) in videos.items():
        write_clip(root / name, frames, seed)
    return root


def build(root: Path, out: Path, model_dir: Path, **kw):
    kw = {"segment_seconds": 1.0, "num_workers": 0, "progress": False, **kw}
    return build_index(root, out, model_dir, **kw)


def file_ids(out: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:
        return dict(conn.execute("SELECT path, id FROM files"))


# ---------------------------------------------------------------------------------------------- 1. symlinks
def test_links_out_of_the_folder_are_not_indexed(tmp_path, model_dir):
    root = make_videos(tmp_path / "videos")
    outside = write_clip(tmp_path / "elsewhere" / "private.mp4", 10, seed=9)
    os.symlink(outside, root / "out.mp4")  # out of the folder: not followed
    os.symlink(root / "a.mp4", root / "in.mp4")  # inside: indexed like a file
    report = build(root, tmp_path / "idx", model_dir)
    assert sorted(file_ids(tmp_path / "idx")) == sorted([*VIDEOS, "in.mp4"])
    assert report.failed == [
        (str(root / "out.mp4"), "a symbolic link to a file outside the indexed folder (not followed)")
    ]
    assert all(h.relpath != "out.mp4" for h in open_index(tmp_path / "idx").search("x", 50))


def test_a_link_swapped_under_the_running_server_is_never_followed_out(tmp_path, model_dir):
    root = make_videos(tmp_path / "videos")
    os.symlink("sub/b.mkv", root / "link.mp4")
    secret = tmp_path / "secret.mp4"  # outside the folder; its bytes must never come back
    secret.write_bytes(b"SECRET-" * 5000)
    build(root, tmp_path / "idx", model_dir)
    link_id = file_ids(tmp_path / "idx")["link.mp4"]
    with TestClient(create_app(tmp_path / "idx")) as client:  # server exceptions would raise here
        assert client.get(f"/api/video/{link_id}").content == (root / "sub/b.mkv").read_bytes()
        seen, fresh = sorted(
            h.id for h in open_index(tmp_path / "idx").search("x", 50) if h.file_id == link_id
        )
        assert client.get(f"/api/thumbnail/{seen}").status_code == 200  # `fresh` is never cached

        def swap(target: str | Path) -> None:  # ln -sfn target link.mp4, atomically
            os.symlink(target, root / "tmp-link")
            os.replace(root / "tmp-link", root / "link.mp4")

        for target in (secret, "/etc/passwd", root / "a.mp4", root / "sub"):
            swap(target)
            for method, url, headers in (
                ("GET", f"/api/video/{link_id}", {}),
                ("GET", f"/api/video/{link_id}", {"Range": "bytes=0-99"}),
                ("HEAD", f"/api/video/{link_id}", {}),
                ("GET", f"/api/thumbnail/{fresh}", {}),
            ):
                r = client.request(method, url, headers=headers)
                assert r.status_code == 409, (target, url, r.status_code)
                assert b"SECRET" not in r.content and b"root:" not in r.content
                if method == "GET":
                    assert "link.mp4" in r.json()["error"] and str(tmp_path) not in r.json()["error"]
        swap("sub/b.mkv")  # put back: served again
        assert client.get(f"/api/video/{link_id}").content == (root / "sub/b.mkv").read_bytes()
        assert client.get(f"/api/thumbnail/{fresh}").status_code == 200


# ---------------------------------------------------------------------------------------------- 2. no paths leak
def test_responses_name_files_relative_and_the_model_by_name(tmp_path, model_dir):
    root = make_videos(tmp_path / "videos")
    build(root, tmp_path / "idx", model_dir)
    with TestClient(create_app(tmp_path / "idx")) as client:
        info = client.get("/api/info").json()
        assert info["model"] == f"{model_dir.parent.name}/{model_dir.name}"  # its last two path components
        hit = client.get("/api/search", params={"q": "x", "k": 1}).json()["results"][0]
        # same size and mtime, other bytes: the identity holds, the decoder fails; the message stays relative
        target = root / hit["path"]
        st = target.stat()
        target.write_bytes(b"\x00" * st.st_size)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        from stanvid.video.decode import clear_frame_index_cache

        clear_frame_index_cache()
        r = client.get(hit["thumbnail_url"])
        assert r.status_code == 409 and hit["path"] in r.json()["error"]
        for body in (r.text, client.get("/api/info").text, client.get("/api/search?q=x").text):
            assert str(tmp_path) not in body and str(model_dir) not in body


# ---------------------------------------------------------------------------------------------- 3. replaced by a dir
def test_a_file_replaced_by_a_directory_is_409_before_any_byte(tmp_path, model_dir):
    root = make_videos(tmp_path / "videos")
    build(root, tmp_path / "idx", model_dir)
    fid = file_ids(tmp_path / "idx")["c.mp4"]
    with TestClient(create_app(tmp_path / "idx")) as client:  # raise_server_exceptions: no traceback allowed
        (root / "c.mp4").unlink()
        (root / "c.mp4").mkdir()
        for method in ("GET", "HEAD"):
            r = client.request(method, f"/api/video/{fid}")
            assert r.status_code == 409 and r.content[:1] in (b"{", b"")
        assert "c.mp4" in client.get(f"/api/video/{fid}").json()["error"]
        assert "directory" in client.get(f"/api/video/{fid}").json()["error"]
        (root / "c.mp4").rmdir()
        assert client.get(f"/api/video/{fid}").status_code == 404  # gone


# ---------------------------------------------------------------------------------------------- 4. non-UTF-8 names
def test_a_name_that_is_not_utf8_is_listed_and_stops_nothing(tmp_path, model_dir, capsys):
    root = make_videos(tmp_path / "videos")
    write_clip(root / "tmp.mp4", 10, seed=7)
    os.rename(root / "tmp.mp4", os.fsencode(root) + b"/zz\xff.mp4")  # printf 'zz\xff'
    out = tmp_path / "idx"
    argv = [
        "index",
        str(root),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "zz\\xff.mp4: the file name is not valid UTF-8" in captured.out
    assert sorted(file_ids(out)) == sorted(VIDEOS)  # the rest is indexed, committed, searchable
    assert len(list(out.glob("embeddings-*.f32"))) == 1
    assert len(open_index(out).search("x", 10)) == len(VIDEOS)
    assert cli_main(argv) == 0  # and every rerun goes through too
    assert "3 unchanged" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 5. damaged files
@pytest.fixture(scope="module")
def good_index(tmp_path_factory, model_dir):
    base = tmp_path_factory.mktemp("good")
    root = make_videos(base / "videos")
    build(root, base / "idx", model_dir)
    return root, base / "idx"


def copy_index(good_index, tmp_path) -> Path:
    out = tmp_path / "idx"
    shutil.copytree(good_index[1], out)
    return out


def vector_file(out: Path) -> Path:
    return next(out.glob("vectors-*.faiss"))


def store_file(out: Path) -> Path:
    return next(out.glob("embeddings-*.f32"))


@pytest.fixture(scope="module")
def good_ivf(tmp_path_factory, model_dir, good_index):
    """The same folder indexed approximately (IVF-PQ from the first vector on), so it has a vector index file."""
    root, _ = good_index
    out = tmp_path_factory.mktemp("good_ivf") / "idx"
    report = build(root, out, model_dir, approx_threshold=1)
    assert report.vector_index.startswith("approximate IVF-PQ")
    return root, out


def damage_file(path: Path, damage: str, foreign: Path | None = None) -> None:
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:  # a valid file of the same kind from another index of the same model
        shutil.copy(foreign, path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "foreign"])
def test_a_damaged_vector_index_file_is_searched_exactly_then_rewritten(
    good_ivf, good_index, tmp_path, model_dir, capsys, caplog, damage
):
    root, good = good_ivf
    out = copy_index(good_ivf, tmp_path)
    vectors = vector_file(out)
    other = None
    if damage == "foreign":
        other = tmp_path / "other"
        build(make_videos(tmp_path / "v2", {"a.mp4": (20, 1)}), other, model_dir, approx_threshold=1)
        other = vector_file(other)
    damage_file(vectors, damage, other)
    expected = [(h.id, h.score) for h in open_index(good_index[1]).search("a red ball", 50)]  # exact
    with caplog.at_level(logging.WARNING, logger="stanvid"):
        with open_index(out) as index:
            got = [(h.id, h.score) for h in index.search("a red ball", 50)]
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-6)
    assert any(vectors.name in r.getMessage() and "exactly" in r.getMessage() for r in caplog.records)
    with TestClient(create_app(out)) as client:
        found = client.get("/api/search", params={"q": "a red ball", "k": 50}).json()["results"]
        assert len(found) == len(got)
    assert cli_main(["search", str(out), "a red ball", "-k", "50"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    build(root, out, model_dir, approx_threshold=1)  # `stanvid index` stores a good one again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stanvid"):
        with open_index(out) as index:
            assert len(index) == len(got) and index.vectors.kind == "ivfpq"
    assert not caplog.records


def test_a_vector_file_hashed_once_is_trusted_by_identity_until_it_changes(
    good_ivf, good_index, tmp_path, model_dir, caplog, monkeypatch
):
    from stanvid import fileio
    from stanvid.search.index import maintain

    root, _ = good_ivf
    out = copy_index(good_ivf, tmp_path)
    monkeypatch.setattr(fileio, "SETTLE_SECONDS", 0.05)
    time.sleep(0.1)
    build(root, out, model_dir, approx_threshold=1)  # nothing to do but hash the files: identities recorded
    with open_index(out) as index:
        record = index.meta["ann"]
    vectors = out / record["file"]
    st = vectors.stat()
    assert record["file_identity"] == [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    assert record["trained_identity"][1] == (out / record["trained"]).stat().st_ino
    expected = [h.id for h in open_index(good_index[1]).search("a red ball", 50)]

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed")

    with monkeypatch.context() as m:
        m.setattr(maintain, "sha256_file", no_hashing)
        with open_index(out) as index:  # the recorded files, unchanged: not read before they are mapped
            assert index.vectors.kind == "ivfpq" and len(index.search("a red ball", 50)) == len(expected)
        build(root, out, model_dir, approx_threshold=1)
    # damaged in place, same size, its mtime set back: the ctime differs, so it is hashed and refused
    vectors.write_bytes(np.random.default_rng(0).bytes(st.st_size))
    os.utime(vectors, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="stanvid"):
        with open_index(out) as index:
            assert [h.id for h in index.search("a red ball", 50)] == expected  # searched exactly
    assert any(vectors.name in r.getMessage() and "exactly" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "foreign", "flipped"])
def test_a_damaged_store_is_one_line_and_index_encodes_what_it_lost_again(
    good_index, tmp_path, model_dir, capsys, caplog, damage
):
    root, good = good_index
    out = copy_index(good_index, tmp_path)
    store = store_file(out)
    if damage == "flipped":  # one row's bytes changed in place: only the chunk hashes can tell
        with open(store, "r+b") as f:
            f.seek(4096 + 20)
            f.write(b"\x7f" * 8)
    else:
        other = None
        if damage == "foreign":
            other = tmp_path / "other"
            build(make_videos(tmp_path / "v2", {"a.mp4": (20, 1)}), other, model_dir)
            other = store_file(other)
        damage_file(store, damage, other)
    one_line_error(capsys, ["search", str(out), "x"], store.name)
    with pytest.raises(VideoIndexError, match=store.name):
        create_app(out)
    with caplog.at_level(logging.WARNING, logger="stanvid"):
        report = build(root, out, model_dir)
    assert report.indexed >= 1 and any("encoded again" in r.getMessage() for r in caplog.records)
    fixed, reference = rows(out), rows(good)  # every file back, the same embeddings
    assert [r[:3] for r in fixed] == [r[:3] for r in reference]
    for r, ref in zip(fixed, reference, strict=True):
        np.testing.assert_allclose(r[3], ref[3], atol=1e-6)
    assert len(open_index(out).search("x", 100)) == len(reference)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_database_is_one_line_in_search_serve_and_index(
    good_index, tmp_path, model_dir, capsys, damage
):
    root, _ = good_index
    out = copy_index(good_index, tmp_path)
    db = out / DB_NAME
    data = db.read_bytes()
    db.write_bytes(
        {"truncated": data[: len(data) // 3], "garbage": b"not sqlite" * 1000, "empty": b""}[damage]
    )
    one_line_error(capsys, ["search", str(out), "x"], str(db))
    one_line_error(capsys, ["serve", str(out), "--port", "1"], str(db))  # refused before it listens
    with pytest.raises(VideoIndexError, match=DB_NAME):
        create_app(out)
    argv = ["index", str(root), "--model", str(model_dir), "--out", str(out), "--segment-seconds", "1"]
    if damage == "empty":  # an empty file is an empty database: the run simply builds the index
        assert cli_main([*argv, "--workers", "0", "--no-progress"]) == 0
        assert sorted(file_ids(out)) == sorted(VIDEOS)
    else:
        one_line_error(capsys, [*argv, "--workers", "0", "--no-progress"], str(db), "move it away")
        assert (
            db.read_bytes() == {"truncated": data[: len(data) // 3], "garbage": b"not sqlite" * 1000}[damage]
        )


@pytest.mark.parametrize(
    "sql, named, repaired",
    [
        ("UPDATE meta SET value = '{bad' WHERE key = 'dim'", "'dim'", False),
        ("DELETE FROM meta WHERE key = 'model_fingerprint'", "'model_fingerprint'", False),
        ("UPDATE meta SET value = '\"seven\"' WHERE key = 'generation'", "'generation'", False),
        ("UPDATE segments SET slot = 999999 WHERE id = (SELECT MIN(id) FROM segments)", "damaged", True),
        (  # just past the store: the slot the re-encoded file's own rows are appended to
            "UPDATE segments SET slot = (SELECT COUNT(*) FROM segments) + 1 WHERE id = (SELECT MIN(id) FROM segments)",
            "damaged",
            True,
        ),
        ("DROP TABLE files", "'files'", True),
        ("DROP TABLE segments", "'segments'", True),
    ],
)
def test_a_damaged_record_names_its_part_and_index_repairs_what_it_can(
    good_index, tmp_path, model_dir, capsys, sql, named, repaired
):
    root, good = good_index
    out = copy_index(good_index, tmp_path)
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:
        conn.execute(sql)
        conn.commit()
    for f in out.glob("vectors-*.faiss"):  # force the rebuild from SQLite that reads every embedding
        f.unlink()
    one_line_error(capsys, ["search", str(out), "x"], str(out / DB_NAME), named)
    argv = ["index", str(root), "--model", str(model_dir), "--out", str(out), "--segment-seconds", "1"]
    argv += ["--workers", "0", "--no-progress"]
    if not repaired:  # the record that says which model made the embeddings: nothing can be verified
        one_line_error(capsys, argv, str(out / DB_NAME), named, "stanvid index")
        return
    assert cli_main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    fixed, reference = rows(out), rows(good)  # every file back, the same embeddings
    assert [r[:3] for r in fixed] == [r[:3] for r in reference]
    for r, ref in zip(fixed, reference, strict=True):
        np.testing.assert_allclose(r[3], ref[3], atol=1e-6)
    assert len(open_index(out).search("x", 100)) == len(reference)


# ---------------------------------------------------------------------------------------------- 6. resources
def write_far_timestamp_mkv(path: Path) -> Path:
    """Two frames, the second stamped 10^10 frame periods after the first: a few hundred bytes that claim a
    duration of 12 years."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        packets = []
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 60 + 100 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            packets += stream.encode(frame)
        packets += stream.encode()
        packets[-1].pts = packets[-1].dts = 10**10
        for packet in packets:
            container.mux(packet)
    return path


def test_a_far_timestamp_costs_what_the_file_holds(tmp_path, model_dir):
    root = tmp_path / "videos"
    write_far_timestamp_mkv(root / "far.mkv")
    import stanvid

    info = stanvid.probe(root / "far.mkv")
    assert info.num_frames == 2 and info.duration > 3e8  # the hostile part is real
    report = build(root, tmp_path / "idx", model_dir, segment_seconds=10.0)
    assert report.failed == [] and report.files == 1
    spans = [(a, b) for _, a, b, _ in rows(tmp_path / "idx")]
    assert len(spans) == 2 and spans[0] == (0.0, 10.0)  # one segment per frame, none of the empty years


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--segment-seconds", "1e-9"], "segment_seconds must be at least 0.1"),
        (["--segment-seconds", "nan"], "segment_seconds"),
        (["--segment-seconds", "inf"], "segment_seconds"),
        (["--workers", "-1"], "num_workers (--workers) must be an integer >= 0"),
        (["--batch-size", "0"], "batch_size"),
        (["--nprobe", "-3"], "nprobe"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, model_dir, capsys, extra, message):
    root = make_videos(tmp_path / "videos", {"a.mp4": (10, 1)})
    one_line_error(
        capsys, ["index", str(root), "--model", str(model_dir), "--out", str(tmp_path / "i"), *extra], message
    )


# ---------------------------------------------------------------------------------------------- 7. one-line errors
def test_out_naming_a_file_is_one_line(tmp_path, model_dir, capsys):
    root = make_videos(tmp_path / "videos", {"a.mp4": (10, 1)})
    (tmp_path / "taken").write_text("mine")
    argv = ["index", str(root), "--model", str(model_dir), "--out", str(tmp_path / "taken")]
    one_line_error(capsys, argv, str(tmp_path / "taken"), "not a directory")
    assert (tmp_path / "taken").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- 8. lock
HOLD = """
import sys, time
from stanvid.locking import exclusive_lock
with exclusive_lock(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_one_index_is_refused_and_a_stale_lock_taken_over(
    tmp_path, model_dir, capsys, caplog
):
    root = make_videos(tmp_path / "videos", {"a.mp4": (10, 1), "c.mp4": (12, 3)})
    out = tmp_path / "idx"
    build(root, out, model_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["index", str(root), "--model", str(model_dir), "--out", str(out), "--segment-seconds", "1"]
        argv += ["--workers", "0", "--no-progress"]
        one_line_error(capsys, argv, f"process {holder.pid}", "in use")
        with pytest.raises(LockHeldError):
            build(root, out, model_dir)
    finally:
        holder.send_signal(signal.SIGKILL)  # killed while holding it: the lock file stays behind
        holder.wait()
    assert str(holder.pid) in (out / LOCK_NAME).read_text()
    with caplog.at_level(logging.WARNING, logger="stanvid"):
        report = build(root, out, model_dir)
    assert report.unchanged == 2
    assert any("stale lock" in r.getMessage() and str(holder.pid) in r.getMessage() for r in caplog.records)
    with exclusive_lock(out / LOCK_NAME, "test"):  # released at the end of the run
        pass


# ---------------------------------------------------------------------------------------------- 10. HEAD
def test_head_answers_the_headers_of_get(good_index):
    _, out = good_index
    fid = file_ids(out)["a.mp4"]
    size = (good_index[0] / "a.mp4").stat().st_size
    with TestClient(create_app(out)) as client:
        r = client.head(f"/api/video/{fid}")
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == str(size) and r.headers["content-type"] == "video/mp4"
        assert r.headers["accept-ranges"] == "bytes"
        r = client.head(f"/api/video/{fid}", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.headers["content-range"] == f"bytes 10-19/{size}"
        assert r.headers["content-length"] == "10" and r.content == b""
        assert client.head("/api/video/999999").status_code == 404
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            r = client.request(method, f"/api/video/{fid}")
            assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {
                "GET",
                "HEAD",
            }
            assert r.json()["error"]


# ---------------------------------------------------------------------------------------------- older indexes
def test_an_index_from_before_file_identities_is_served_and_upgraded_without_re_encoding(
    good_index, tmp_path, model_dir
):
    root, good = good_index
    out = copy_index(good_index, tmp_path)
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:  # the layout of the first release
        conn.execute("ALTER TABLE files DROP COLUMN inode")
        conn.execute("ALTER TABLE files DROP COLUMN device")
        conn.execute("DELETE FROM meta WHERE key = 'vectors'")
        conn.commit()
    fid = file_ids(out)["a.mp4"]
    with TestClient(create_app(out)) as client:
        assert client.get(f"/api/video/{fid}").content == (root / "a.mp4").read_bytes()
    report = build(root, out, model_dir)
    assert (report.indexed, report.unchanged) == (0, len(VIDEOS))
    with contextlib.closing(sqlite3.connect(out / DB_NAME)) as conn:
        recorded = dict(conn.execute("SELECT path, inode FROM files"))
    assert recorded == {name: (root / name).stat().st_ino for name in VIDEOS}
    assert [r[:3] for r in rows(out)] == [r[:3] for r in rows(good)]

"""Hardening, round 2 (issue 32): what hostile and careless input found in shards, embedding imports, the index
and the server, each case reproduced here as its test.

Every case asserts what a user sees: nothing a file contains is run, nothing outside the named folder is read
or packed, work bounded by what a file really holds, one line naming the culprit instead of a traceback, and
counts that disagree with the data are errors, never silently fewer rows.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

import stanvid
from indexkit import (
    DIM,
    archive_files,
    file_vectors,
    index_model,
    rows,
    save_tiny_model,
    write_clip,
    write_shard,
)
from stanvid.cli import main
from stanvid.data import load_video_captions
from stanvid.data.shards import iter_samples, load_shards
from stanvid.errors import DatasetError
from trainkit import recipe
from videogen import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 videos (``videos/``), written by `stanvid.write_shards` as one shard of 3 (``shards/``)."""
    root = tmp_path_factory.mktemp("shards2")
    (root / "videos").mkdir()
    lines = ["video,caption"]
    for i in range(3):
        write_video(root / "videos" / f"v{i}.mp4", make_frames(6, 32, 32, seed=i), fps=10, gop=3)
        lines.append(f"v{i}.mp4,clip number {i}")
    (root / "all.csv").write_text("\n".join(lines) + "\n")
    ann = load_video_captions(root / "all.csv", root / "videos")
    stanvid.write_shards(ann, root / "videos", root / "shards", samples_per_shard=3)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model2") / "model")


def one_line(capsys, argv: list[str], *names: str) -> str:
    """Run the CLI: exit 2 and one stderr line holding every one of ``names``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def write_index(path: Path, entries: list[tuple[str, int]]) -> Path:
    shardlist = [{"url": url, "nsamples": n} for url, n in entries]
    path.write_text(
        json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shardlist})
    )
    return path


def shard_recipe_file(path: Path, root: Path, annotations: str, model: Path, **data) -> Path:
    r = recipe(
        data={
            "dataset": "webdataset",
            "root": str(root),
            "train_annotations": annotations,
            "input_size": 32,
            "test_resize": 32,
            "train_resize": 36,
            **data,
        },  # fmt: skip
        train={"epochs": 1, "batch_size": 1, "output_dir": str(path.parent / "out")},
        model={"source": str(model), "stan_depth": 1},
    )
    path.write_text(yaml.safe_dump(r.to_dict()))
    return path


# ---- 1. a shard index's pipe: URLs are not run unless the user opts in ---------------------------------------


def test_a_shard_index_never_runs_its_pipe_urls_unless_allowed(data, model_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    tar = data / "shards" / "00000.tar"
    index = write_index(tmp_path / "index.json", [(f"pipe:echo ran > {marker}; cat {tar}", 3)])
    one_line(
        capsys,
        ["embed", str(index), "--model", str(model_dir), "--out", str(tmp_path / "f.npy"), "--workers", "0"],
        str(index),
        "shardlist[0]",
        "--allow-pipe",
    )
    recipe_file = shard_recipe_file(tmp_path / "r.yaml", tmp_path, "index.json", model_dir)
    one_line(capsys, ["train", str(recipe_file), "--dry-run"], str(index), "data.allow_pipe_urls")
    with pytest.raises(DatasetError, match="shell command"):
        load_shards(str(index))
    assert not marker.exists()  # nothing ran
    # the user's own opt-in runs it; a pipe: pattern typed by the user runs without one
    allowed = load_shards(str(index), allow_pipe=True)
    assert [s["__key__"] for _, s in iter_samples(allowed.urls[0])] == ["000000000", "000000001", "000000002"]
    assert marker.read_text() == "ran\n"
    assert load_shards(f"pipe:cat {tar}").counts == (3,)


# ---- 2. `stanvid shard` packs only videos and frame folders inside VIDEO_DIR -----------------------------------


def test_shard_packs_only_videos_and_frame_folders_inside_the_video_folder(data, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "u" / ".ssh").mkdir(parents=True)
    secret_key = home / "u" / ".ssh" / "id_rsa"
    secret_key.write_text("-----BEGIN OPENSSH PRIVATE KEY----- SECRET-1")
    videos = tmp_path / "a" / "b" / "videos"
    videos.mkdir(parents=True)
    (tmp_path / "a" / "cred.pem").write_text("CERT SECRET-2")
    for i in range(2):
        (videos / f"v{i}.mp4").write_bytes((data / "videos" / f"v{i}.mp4").read_bytes())
    (videos / "link.mp4").symlink_to(secret_key)  # a video's name, a secret's content
    (videos / "notes.txt").write_text("NOTES SECRET-3")  # inside, but not a video
    ann = tmp_path / "ann.csv"
    ann.write_text(
        f"video,caption\nv0.mp4,good zero\n{secret_key},k1\n../../cred.pem,k2\nlink.mp4,k4\nnotes.txt,k3\n"
        "v1.mp4,good one\n"
    )
    out = tmp_path / "out"
    assert main(["shard", str(ann), str(videos), str(out), "--samples-per-shard", "10"]) == 0
    printed = capsys.readouterr().out
    assert "4 source(s) left out" in printed and "outside the video folder" in printed
    assert "not a video (extension .txt)" in printed
    with tarfile.open(out / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert sorted(members) == [f"{k}.{f}" for k in ("000000000", "000000005") for f in ("json", "mp4", "txt")]
    everything = b"".join(members.values()) + (out / "shards.json").read_bytes()
    for secret in (b"SECRET-", b"OPENSSH", str(tmp_path).encode()):
        assert secret not in everything  # neither the bytes nor an absolute path
    assert members["000000005.mp4"] == (videos / "v1.mp4").read_bytes()
    assert json.loads(members["000000005.json"])["source"] == "v1.mp4"
    assert load_shards(str(out / "shards.json")).counts == (2,)


# ---- the --from-embeddings import: 3, 5, 6, 8, 13, 14 ---------------------------------------------------------


def import_argv(root: Path, out: Path, model: Path, emb: Path, *extra: str) -> list[str]:
    return ["index", str(root), "--model", str(model), "--out", str(out), "--from-embeddings", str(emb),
            "--no-progress", *extra]  # fmt: skip


def write_embeddings(folder: Path, root: Path, name: str = "a.json", rows_=None, **header) -> Path:
    """Two stand-in files of `indexkit.PER_FILE` segments each, as `stanvid embed` writes them; ``header``
    keys replace the header's, ``rows_(rows)`` the rows."""
    path = write_shard(folder / name, archive_files(root, 0, 2), file_vectors(0, 2))
    data = json.loads(path.read_text())
    data.update(header)
    if rows_ is not None:
        data["rows"] = rows_(data["rows"])
    path.write_text(json.dumps(data))
    return path


def test_the_headers_vectors_are_only_a_regular_file_beside_the_json(tmp_path, model_dir, capsys):
    root, emb = tmp_path / "videos", tmp_path / "emb"
    outside = tmp_path / "outside.npy"
    outside.write_bytes(b"root:x:0:0:SECRET-BYTES" * 10)
    (tmp_path / "emb").mkdir()
    (emb / "link.npy").symlink_to(outside)
    for i, name in enumerate(("/etc/passwd", "../outside.npy", str(outside), "link.npy", "sub/x.npy", 7)):
        (emb / "a.json").unlink(missing_ok=True)
        bad = write_embeddings(emb, root, vectors=name)
        err = one_line(capsys, import_argv(root, tmp_path / f"idx{i}", model_dir, emb), str(bad), "vectors")
        assert "root:" not in err and "SECRET" not in err
    (emb / "link.npy").unlink()
    garbage = write_embeddings(emb, root)  # a regular file beside it, but not a .npy: its bytes not echoed
    garbage.with_suffix(".npy").write_bytes(b"root:x:0:0:SECRET-BYTES" * 10)
    err = one_line(capsys, import_argv(root, tmp_path / "idx", model_dir, emb), "a.npy", "not a .npy file")
    assert "root:" not in err and "SECRET" not in err


def run_with_fifo_release(fifo: Path, call):
    """``call()`` in a thread; if it still blocks after 60 s (a FIFO opened), open the FIFO's other end so
    that the thread ends, and fail."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        with open(fifo, "wb"):
            pass
        worker.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return result[0]


def test_a_fifo_named_like_an_embedding_file_is_refused_not_waited_on(tmp_path, model_dir, capsys):
    root, emb = tmp_path / "videos", tmp_path / "emb"
    write_embeddings(emb, root)
    fifo = emb / "z.json"
    os.mkfifo(fifo)
    argv = import_argv(root, tmp_path / "idx", model_dir, emb)
    assert run_with_fifo_release(fifo, lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert str(fifo) in err and "not a regular file" in err and len(err.strip().splitlines()) == 1
    fifo.unlink()
    os.mkfifo(emb / "v.npy")
    (emb / "a.json").write_text((emb / "a.json").read_text().replace('"a.npy"', '"v.npy"'))
    assert run_with_fifo_release(emb / "v.npy", lambda: main(argv)) == 2
    assert "v.npy: not a regular file" in capsys.readouterr().err
    (emb / "v.npy").unlink()
    (emb / "a.json").write_text((emb / "a.json").read_text().replace('"v.npy"', '"a.npy"'))
    assert main(argv) == 0  # the same files, the FIFOs gone: imported
    assert len(rows(tmp_path / "idx")) == len(file_vectors(0, 2))


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it (all instances together)."""

    read_bytes = 0

    def readinto(self, buffer) -> int | None:
        n = super().readinto(buffer)
        CountingFile.read_bytes += n or 0
        return n


def test_a_corrupt_embedding_json_fails_where_it_breaks_reading_no_further(
    tmp_path, model_dir, monkeypatch, capsys
):
    from stanvid.search.index import imports

    root, emb = tmp_path / "videos", tmp_path / "emb"
    path = write_embeddings(emb, root)
    good = json.loads(path.read_text())
    head = json.dumps({k: v for k, v in good.items() if k != "rows"})[:-1]
    rows_text = ", ".join(json.dumps(r) for r in good["rows"] * 120)  # 4,800 rows (< COMMIT_ROWS in all)
    text = head + ', "rows": [' + ", ".join([rows_text] * 6) + ", @"
    where = len(text) - 1
    path.write_text(text + " " * (32 << 20) + "]}")  # 32 MiB after the damage
    monkeypatch.setattr(imports, "open_regular", lambda p: io.BufferedReader(CountingFile(p)))
    err = one_line(capsys, import_argv(root, tmp_path / "idx", model_dir, emb), str(path))
    assert f"at character {where}" in err and where > 2 * imports._READ  # the file's position, not a buffer's
    assert CountingFile.read_bytes < where + 3 * imports._READ  # not the 32 MiB after it
    CountingFile.read_bytes = 0
    path.write_text(head + ', "rows": [' + "[" * 100_000 + "]" * 100_000 + "]}")  # nested: no RecursionError
    assert "nested too deeply" in one_line(
        capsys, import_argv(root, tmp_path / "idx", model_dir, emb), str(path)
    )
    path.write_text('{"dim": ' + "[" * 100_000 + "]" * 100_000 + ', "rows": []}')  # in the header too
    assert "nested too deeply" in one_line(
        capsys, import_argv(root, tmp_path / "idx", model_dir, emb), str(path)
    )
    path.write_text(head + ', "x": "' + "a" * (20 << 20) + '", "rows": []}')  # one value past the bound
    assert "longer than" in one_line(capsys, import_argv(root, tmp_path / "idx", model_dir, emb), str(path))


def test_repeated_rows_are_imported_once_and_found_once(tmp_path, model_dir, capsys):
    root, emb = tmp_path / "videos", tmp_path / "emb"
    path = write_shard(emb / "a.json", archive_files(root, 0, 2), file_vectors(0, 2))
    data = json.loads(path.read_text())
    half = len(data["rows"]) // 2  # the first file's rows
    data["rows"] = data["rows"][:half] + data["rows"][:3] + data["rows"][half:]  # 3 rows of file 0 again
    vectors = np.load(path.with_suffix(".npy"))
    np.save(path.with_suffix(".npy"), np.concatenate([vectors[:half], vectors[:3], vectors[half:]]))
    path.write_text(json.dumps(data))
    assert main(import_argv(root, tmp_path / "idx", model_dir, emb)) == 0
    assert "3 repeated row(s)" in capsys.readouterr().out
    found = rows(tmp_path / "idx")
    assert len(found) == len(vectors) and len({r[:3] for r in found}) == len(vectors)
    with stanvid.open_index(tmp_path / "idx", model=index_model()) as index:
        hits = index.search_embeddings(vectors[:1], k=len(vectors))[0]
    assert len({(h.relpath, h.start, h.end) for h in hits}) == len(hits)  # no segment returned twice


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("size 2**70", {"rows": lambda r: [{**r[0], "size": 2**70}, *r[1:]]}, "row 0 has a bad size"),
        ("mtime -1", {"rows": lambda r: [{**r[0], "mtime_ns": -1}, *r[1:]]}, "row 0 has a bad mtime_ns"),
        (
            "lone surrogate",
            {"rows": lambda r: [{**r[0], "path": "a\udc80.mp4"}, *r[1:]]},
            "row 0 has a bad path",
        ),
        ("dim as text", {"dim": str(DIM)}, f"a dim of '{DIM}', not a whole number"),
        ("dim 8", {"dim": 8}, "vectors of dimension 8"),
        ("bad segments", {"segment_seconds": "1"}, "segment_seconds '1' is not a positive number"),
        ("header a list", None, "not a JSON object at character 0"),
    ],
)
def test_bad_embedding_values_are_one_line_naming_them(tmp_path, model_dir, capsys, case, change, message):
    root, emb = tmp_path / "videos", tmp_path / "emb"
    if change is None:
        path = write_embeddings(emb, root)
        path.write_text("[1, 2]")
    else:
        fix_rows = change.pop("rows", None)
        path = write_embeddings(emb, root, rows_=fix_rows, **change)
    err = one_line(
        capsys, import_argv(root, tmp_path / "idx", model_dir, emb, "--segment-seconds", "1"), str(path)
    )
    assert message in err and "None" not in err


def test_a_new_index_takes_the_embeddings_segment_length(tmp_path, model_dir, capsys):
    root, emb = tmp_path / "videos", tmp_path / "emb"
    write_embeddings(emb, root)  # segments of 1 s
    assert main(import_argv(root, tmp_path / "idx", model_dir, emb)) == 0  # no --segment-seconds
    assert len(rows(tmp_path / "idx")) == len(file_vectors(0, 2))
    err = one_line(
        capsys, import_argv(root, tmp_path / "idx", model_dir, emb, "--segment-seconds", "2"), "idx"
    )
    assert "segments of 1 s, not segments of 2 s" in err
    whole = write_embeddings(tmp_path / "emb2", root, segment_seconds=None)
    err = one_line(capsys, import_argv(root, tmp_path / "idx", model_dir, whole), "idx")
    assert "built with segments of 1 s, not whole videos (no --segment-seconds)" in err


@pytest.mark.parametrize("kind", ["string", "double", "struct", "list of lists"])
def test_a_parquet_vector_column_of_another_type_is_one_line(tmp_path, model_dir, capsys, kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "videos"
    files = archive_files(root, 0, 1)
    n = len(file_vectors(0, 1))
    column = {
        "string": pa.array(["0.1"] * n),
        "double": pa.array([0.1] * n),
        "struct": pa.array([{"x": 0.1}] * n),
        "list of lists": pa.array([[[0.1] * DIM]] * n),
    }[kind]
    table = pa.table(
        {
            "path": [files[0][0]] * n,
            "start": [float(j) for j in range(n)],
            "end": [j + 1.0 for j in range(n)],
            "vector": column,
        }  # fmt: skip
    )
    source = json.loads(write_embeddings(tmp_path / "h", root).read_text())
    header = {k: v for k, v in source.items() if k not in ("rows", "vectors")}
    table = table.replace_schema_metadata({"stanvid": json.dumps(header)})
    (tmp_path / "emb").mkdir()
    pq.write_table(table, tmp_path / "emb" / "a.parquet")
    err = one_line(
        capsys, import_argv(root, tmp_path / "idx", model_dir, tmp_path / "emb" / "a.parquet"), "a.parquet"
    )
    assert "column vector holds" in err


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--shard", "²/3"], {}, "--shard must be I/N"),
        (["--shard", "0/²"], {}, "--shard must be I/N"),
        ([], {"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment is not a whole number"),
        ([], {"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' in the environment is not a whole number"),
        ([], {"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 in the environment is not below WORLD_SIZE=2"),
    ],
)
def test_bad_shares_and_launch_variables_are_one_line(
    data, model_dir, tmp_path, monkeypatch, capsys, argv, env, message
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "f.npy"
    base = [
        "embed",
        str(data / "videos"),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert message in one_line(capsys, [*base, *argv])
    assert not out.exists()


# ---- 7. sample counts that disagree with the tar --------------------------------------------------------------


def cut_after(tar: Path, out: Path, samples: int) -> Path:
    """``tar`` cut at the member boundary where sample ``samples`` starts (no tar end marker)."""
    with tarfile.open(tar) as t:
        first = next(m for m in t if m.name.startswith(f"{samples:09d}."))
    out.write_bytes(tar.read_bytes()[: first.offset])
    return out


def test_counts_that_disagree_with_the_tar_are_errors_naming_the_shard(data, model_dir, tmp_path, capsys):
    good = data / "shards" / "00000.tar"
    cut = cut_after(good, tmp_path / "cut.tar", 2)
    embed = ["--model", str(model_dir), "--out", str(tmp_path / "f.npy"), "--workers", "0", "--no-progress"]
    one_line(capsys, ["shard", "--index", str(cut), str(tmp_path / "i.json")], str(cut), "cut short")
    one_line(capsys, ["embed", str(cut), *embed], str(cut), "cut short")
    one_line(capsys, ["embed", f"pipe:cat {cut}", *embed], str(cut), "cut short")  # streamed: the same
    for shard, n, message in ((cut, 3, "cut short"), (good, 2, "holds 3 samples, its index says 2")):
        index = write_index(tmp_path / "index.json", [(str(shard), n)])
        one_line(capsys, ["embed", str(index), *embed], str(shard), message)
        recipe_file = shard_recipe_file(tmp_path / "r.yaml", tmp_path, "index.json", model_dir)
        one_line(capsys, ["train", str(recipe_file), "--dry-run"], str(shard), message)
    assert not (tmp_path / "f.npy").exists()
    write_index(tmp_path / "index.json", [(str(good), 10**30)])
    one_line(capsys, ["train", str(recipe_file), "--dry-run"], "index.json", "shardlist[0]")
    with pytest.raises(DatasetError, match="cut short"):
        list(iter_samples(str(cut)))
    write_index(tmp_path / "index.json", [(str(good), 3)])  # the truth: accepted
    assert (
        main(["embed", str(tmp_path / "index.json"), *embed]) == 0
        and "wrote 3 rows" in capsys.readouterr().out
    )


# ---- 9. a shard training set iterated as any PyTorch dataset --------------------------------------------------


def test_an_unconfigured_shard_training_set_gives_the_whole_epoch(data, tmp_path):
    from torch.utils.data import DataLoader

    ann = load_video_captions(data / "all.csv", data / "videos")
    stanvid.write_shards(ann, data / "videos", tmp_path / "s", samples_per_shard=2)  # 2 + 1 samples
    r = recipe(data={"dataset": "webdataset", "root": str(tmp_path), "train_annotations": "s/shards.json"})
    dataset = stanvid.build_dataset(r, "train")
    items = list(dataset)
    assert sorted(i["video_id"].rpartition(":")[2] for i in items) == ["000000000", "000000001", "000000002"]
    assert len(list(DataLoader(dataset, batch_size=None))) == 3  # as any dataset: every sample once
    with pytest.raises(Exception, match=r"dataset\.configure\(world, rank, readers=num_workers"):
        list(DataLoader(dataset, batch_size=None, num_workers=2))


# ---- 4. a member that inflates past the bound -----------------------------------------------------------------


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as read (the bomb is never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def write_bomb(path: Path, size: int, good: Path) -> Path:
    """A gzip shard: a good sample, then one whose mp4 inflates to ``size`` bytes (a few hundred KB on disk)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        with tarfile.open(good) as src:
            for m in list(src)[:3]:  # sample 000000000: json, mp4, txt
                tar.addfile(m, src.extractfile(m))
        for name, data in (("000000001.txt", b"the bomb"), ("000000001.mp4", None)):
            info = tarfile.TarInfo(name)
            info.size = len(data) if data is not None else size
            tar.addfile(info, io.BytesIO(data) if data is not None else io.BufferedReader(Zeros(size)))
    return path


def test_a_sample_inflating_past_the_bound_is_refused_by_name(data, model_dir, tmp_path, capsys):
    bomb = write_bomb(tmp_path / "bomb.tar.gz", 129 << 20, data / "shards" / "00000.tar")
    assert bomb.stat().st_size < 1 << 20
    name = f"{bomb}:000000001"
    embed = [
        "embed",
        str(bomb),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "f.npy"),
        "--workers",
        "0",
        "--no-progress",
    ]
    err = one_line(capsys, embed, name, "128 MiB")  # the default bound
    assert "data.max_sample_mb" in err and "--max-sample-mb" in err
    small = write_bomb(tmp_path / "small.tar.gz", 3 << 20, data / "shards" / "00000.tar")
    one_line(capsys, [*embed[:1], str(small), *embed[2:], "--max-sample-mb", "2"], f"{small}:000000001")
    r = recipe(data={"dataset": "webdataset", "root": str(tmp_path), "train_annotations": "small.tar.gz",
                     "max_sample_mb": 2})  # fmt: skip
    with pytest.raises(DatasetError, match=rf"{small}:000000001: .* \(2 MiB: data.max_sample_mb"):
        list(stanvid.build_dataset(r, "train"))  # training reads it as embed does
    with pytest.raises(DatasetError, match="000000001"):
        list(iter_samples(str(small), max_bytes=2 << 20))
    assert [o for o, _ in iter_samples(str(small), max_bytes=4 << 20)] == [0, 1]  # under the bound: read


# ---- the index under a running server: 10, 11, 15 -------------------------------------------------------------

SERVED = {"a.mp4": (20, 1), "sub/b.mkv": (15, 2), "c.mp4": (12, 3)}


def build(root: Path, out: Path, model: Path, **kw):
    kw = {"segment_seconds": 1.0, "num_workers": 0, "progress": False, **kw}
    return stanvid.build_index(root, out, model, **kw)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, model_dir) -> tuple[Path, Path, Path]:
    """(videos, exact index, IVF-PQ index of the same videos)."""
    base = tmp_path_factory.mktemp("served")
    for name, (frames, seed) in SERVED.items():
        write_clip(base / "videos" / name, frames, seed)
    build(base / "videos", base / "flat", model_dir)
    assert build(base / "videos", base / "ivf", model_dir, approx_threshold=1).vector_index.startswith(
        "approx"
    )
    return base / "videos", base / "flat", base / "ivf"


def test_a_vector_file_overwritten_in_place_under_a_server_is_searched_exactly(
    indexes, model_dir, tmp_path, caplog
):
    from fastapi.testclient import TestClient

    from stanvid.search.server.app import create_app

    root, flat, ivf = indexes
    out = tmp_path / "idx"
    shutil.copytree(ivf, out)
    other = tmp_path / "other"  # a valid vector file of another index of the same model, larger
    build(root.parent / "videos", other, model_dir, approx_threshold=1, segment_seconds=0.5)
    with stanvid.open_index(flat) as exact:
        expected = [(h.id, round(h.score, 5)) for h in exact.search("a red ball", 50)]
    with TestClient(create_app(out)) as client:
        before = client.get("/api/search", params={"q": "a red ball", "k": 50})
        assert before.status_code == 200
        first = before.json()["results"][0]["id"]
        vectors = next(out.glob("vectors-*.faiss"))
        inode = vectors.stat().st_ino
        shutil.copyfile(next(other.glob("vectors-*.faiss")), vectors)  # written into the same inode
        assert vectors.stat().st_ino == inode
        with caplog.at_level(logging.WARNING, logger="stanvid"):
            after = client.get("/api/search", params={"q": "a red ball", "k": 50})
            like = client.get(f"/api/like/{first}", params={"k": 5})
    assert after.status_code == 200 and like.status_code == 200, (after.text, like.text)
    assert [(h["id"], round(h["score"], 5)) for h in after.json()["results"]] == expected
    assert any("written in place" in r.getMessage() and "exactly" in r.getMessage() for r in caplog.records)


def test_a_repair_never_publishes_an_emptier_index(indexes, model_dir, tmp_path, caplog):
    root, flat, _ = indexes
    out, other = tmp_path / "idx", tmp_path / "other"
    shutil.copytree(flat, out)
    build(root, other, model_dir, segment_seconds=0.5)  # another index's store, to copy over this one's
    seen: list[tuple[int, int]] = []
    with stanvid.open_index(out, follow=None) as index:
        before = (index.num_files(), len(index))
        store = next(out.glob("embeddings-*.f32"))
        foreign = store.with_name(".foreign")
        shutil.copyfile(next(other.glob("embeddings-*.f32")), foreign)
        os.replace(foreign, store)  # every vector lost: the repair drops every file, then encodes them again

        def on_commit(_: int) -> None:  # as a server following the index would see each commit
            index.refresh()
            seen.append((index.num_files(), len(index)))

        with caplog.at_level(logging.WARNING, logger="stanvid"):
            build(root, out, model_dir, on_commit=on_commit, batch_size=4)
        assert seen and all(state == before for state in seen)  # never the repair's emptier states
        assert any("a repair is under way" in r.getMessage() for r in caplog.records)
        assert index.refresh() and (index.num_files(), len(index)) == before  # the repaired one, once done
    assert [r[:3] for r in rows(out)] == [r[:3] for r in rows(flat)]


HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
time.sleep(120)
"""


def test_a_locked_index_names_who_holds_it(indexes, tmp_path, model_dir, monkeypatch, capsys):
    from stanvid.search.index import DB_NAME, store

    root, flat, _ = indexes
    out = tmp_path / "idx"
    shutil.copytree(flat, out)
    monkeypatch.setattr(store, "BUSY_SECONDS", 0.5)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / DB_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["index", str(root), "--model", str(model_dir), "--out", str(out), "--segment-seconds", "1",
                "--workers", "0", "--no-progress"]  # fmt: skip
        err = one_line(capsys, argv, str(out / DB_NAME), f"open in process {holder.pid} (", "stayed locked")
        assert "let it finish or stop it" in err
    finally:
        holder.kill()
        holder.wait()


def test_closing_does_not_wait_for_a_load_stuck_on_a_lock(indexes, tmp_path, model_dir, monkeypatch):
    from stanvid.search.index import follow

    root, out = tmp_path / "videos", tmp_path / "idx"
    shutil.copytree(indexes[0], root)
    build(root, out, model_dir)
    index = stanvid.open_index(out, follow=None)
    write_clip(root / "new.mp4", 10, 9)
    build(root, out, model_dir)  # a newer committed state to load
    release = threading.Event()
    real = follow.load_snapshot

    def stuck(*args, **kw):  # as a load waiting for another process's lock
        release.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(follow, "load_snapshot", stuck)
    outcome: list = []
    loading = threading.Thread(target=lambda: outcome.append(index.refresh()), daemon=True)
    loading.start()
    index.close()
    assert loading.is_alive(), outcome  # close returned while the load still waits
    release.set()
    loading.join(60)


def test_a_swapped_index_folder_is_logged_as_another_index(indexes, tmp_path, model_dir, caplog):
    root, flat, ivf = indexes
    out = tmp_path / "idx"
    shutil.copytree(flat, out)
    with stanvid.open_index(out, follow=None) as index:
        shutil.move(out, tmp_path / "old")
        shutil.copytree(ivf, out)  # another index, swapped in under the same name
        with caplog.at_level(logging.INFO, logger="stanvid"):
            assert index.refresh()
    said = [r.getMessage() for r in caplog.records if "answering from" in r.getMessage()]
    assert said and "another index now in the folder" in said[-1] and "new vector index" not in said[-1]


# ---- the same kinds of input elsewhere -----------------------------------------------------------------------


def test_digits_that_int_refuses_are_dataset_errors(data, tmp_path):
    from stanvid.data import load_kinetics
    from stanvid.data.shard_dataset import SampleFields

    for line in ("v0.mp4 ²", "v0.mp4 ² 1"):
        (tmp_path / "k.txt").write_text(line + "\n")
        with pytest.raises(DatasetError, match="k.txt"):
            load_kinetics(tmp_path / "k.txt", data / "videos", ["a", "b"])
    with pytest.raises(DatasetError, match="s.tar:k"):
        SampleFields("recognition", classes=["a", "b"]).label(
            {"__url__": "s.tar", "__key__": "k", "cls": "²".encode()}
        )


def test_huge_tar_headers_and_unknown_schemes_are_one_line(data, model_dir, tmp_path, capsys):
    huge = tmp_path / "pax.tar"
    with tarfile.open(huge, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("000000000.txt")
        info.pax_headers = {"comment": "x" * (2 << 20)}  # an extended header tarfile would read whole
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    for read in (lambda: load_shards(str(huge)), lambda: list(iter_samples(str(huge)))):
        with pytest.raises(DatasetError, match="an extended header of 2,"):
            read()
    index = write_index(tmp_path / "index.json", [("nope://host/0.tar", 1)])  # no opener for the scheme
    embed = [
        "embed",
        str(index),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "f.npy"),
        "--workers",
        "0",
    ]
    one_line(capsys, [*embed, "--no-progress"], "nope://host/0.tar", "cannot open")

"""WebDataset shards on generated videos (PyAV mp4 + txt + json in tars): each sample once per epoch on 1 and 2
ranks x 0 and 2 workers, exact resume (the loader's tail and a whole training run), damaged samples named, a
missing shard stopping the run, 2 gloo ranks training like one process, evaluation, `stanvid shard` and
`stanvid embed` on shards. Second paths: the uninterrupted run, the files the shards were written from."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stanvid
from stanvid.cli import main
from stanvid.data import load_video_captions
from stanvid.data.base import VideoClipDataset
from stanvid.data.retrieval import RetrievalDataset
from stanvid.data.shard_dataset import (
    SampleFields,
    SampleReader,
    ShardDataset,
    ShardLoader,
    load_shard_annotations,
)
from stanvid.data.shard_order import emission_order, epoch_plan, readers_shards
from stanvid.data.shards import load_shards
from stanvid.distributed import leave_process_group
from stanvid.errors import ConfigError, DatasetError
from stanvid.training.checkpoint import latest_checkpoint, load_checkpoint
from stanvid.training.loop import fit
from stanvid.training.runs import build_dataset
from stanvid.video.transforms import EvalTransform
from test_train import _assert_same_run
from trainkit import assert_close_runs, recipe, train_model
from videogen import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 videos (2 captions each) as 4 shards of 3 (``even/``), 11 as 3+3+3+2 (``uneven/``), 8 as 4 shards
    of 2 (``small/``), each written by `stanvid.write_shards` from a caption csv."""
    root = tmp_path_factory.mktemp("shards")
    (root / "videos").mkdir()
    rows = ["video,caption"]
    for i in range(12):
        write_video(root / "videos" / f"v{i:02d}.mp4", make_frames(8, 32, 32, seed=i), fps=10, gop=4)
        rows += [f"v{i:02d}.mp4,clip number {i}", f"v{i:02d}.mp4,another caption of {i}"]
    (root / "all.csv").write_text("\n".join(rows) + "\n")
    for name, n, per in (("even", 12, 3), ("uneven", 11, 3), ("small", 8, 2)):
        (root / f"{name}.csv").write_text("\n".join(rows[: 1 + 2 * n]) + "\n")
        ann = load_video_captions(root / f"{name}.csv", root / "videos")
        stanvid.write_shards(ann, root / "videos", root / name, samples_per_shard=per)
    return root


def reader(train: bool = False) -> SampleReader:
    return SampleReader(
        SampleFields("retrieval"), EvalTransform(16), num_frames=3, train=train, context_length=16
    )


def epoch_batches(shards, world: int, rank: int, workers: int, batch: int, epoch: int, start: int = 0, **kw):
    loader = ShardLoader(
        ShardDataset(shards, reader(), seed=5, buffer=kw.get("buffer", 2)),
        batch,
        world=world,
        rank=rank,
        num_workers=workers,
        epochs=2,
    )
    loader.set_position(epoch, start)
    return loader, list(loader)


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_each_sample_once_per_epoch_over_ranks_and_workers(data, world, workers):
    shards = load_shards("even/{00000..00003}.tar", data)
    seen = []
    for epoch in (0, 1):
        ids = []
        for rank in range(world):
            loader, batches = epoch_batches(shards, world, rank, workers, 3, epoch)
            assert len(batches) == loader.batches_per_epoch == 4 // world
            ids += [v for b in batches for v in b["video_id"]]
        assert len(ids) == len(set(ids)) == 12  # every sample, none twice
        assert {v.rpartition(":")[0] for v in ids} == set(shards.urls)
        seen.append(ids)
    assert seen[0] != seen[1]  # reshuffled per epoch


def test_uneven_shards_leave_out_exactly_the_readers_tails(data):
    shards = load_shards("uneven/{00000..00003}.tar", data)  # 3, 3, 3, 2 samples
    for world, workers in ((1, 2), (2, 2)):
        k = max(1, workers)
        ids = []
        for rank in range(world):
            loader, batches = epoch_batches(shards, world, rank, workers, 2, 0)
            ids += [v for b in batches for v in b["video_id"]]
            for w in range(k):
                plan = epoch_plan(
                    shards.counts,
                    world=world,
                    rank=rank,
                    k=k,
                    w=w,
                    batch_size=2,
                    batches=loader.batches_per_epoch,
                    batches_done=0,
                    buffer=2,
                    seed=5,
                    epoch=0,
                )
                assert len(plan.order) + plan.left_out == sum(plan.counts)
        assert len(set(ids)) == len(ids) == loader.batches_per_epoch * 2 * world  # at most once, full batches
    # 4 readers of 3, 3, 3, 2 samples: 2 per rank stream position i % 2; the 2-sample reader bounds the epoch
    assert len(ids) == 8


def test_two_ranks_see_the_global_batches_of_one_rank_with_two_workers(data):
    shards = load_shards("even/{00000..00003}.tar", data)
    _, one = epoch_batches(shards, 1, 0, 2, 6, 1)
    ranks = [epoch_batches(shards, 2, r, 0, 3, 1)[1] for r in range(2)]
    for step, batch in enumerate(one):
        together = ranks[0][step]["video_id"] + ranks[1][step]["video_id"]
        assert sorted(batch["video_id"]) == sorted(together)


def test_the_order_is_a_function_of_the_counts_alone():
    counts = [5, 5, 4, 5, 3, 5]
    shards = readers_shards(counts, 3, seed=1, epoch=2)
    assert sorted(s for mine in shards for s in mine) == list(range(6))
    assert shards == readers_shards(counts, 3, seed=1, epoch=2) != readers_shards(counts, 3, seed=1, epoch=3)
    order = emission_order(40, 8, seed=1, epoch=0, reader=0)
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    assert emission_order(40, 1, seed=1, epoch=0, reader=0).tolist() == list(
        range(40)
    )  # no buffer, no shuffle
    assert all(order[i] <= i + 8 for i in range(40))  # a buffer of 8 holds no sample longer than it can
    with pytest.raises(ConfigError, match="6 shard\\(s\\) for 8 readers"):
        readers_shards(counts, 8, 0, 0)


def test_resume_continues_after_the_last_batch_without_decoding_what_it_skips(data, monkeypatch):
    shards = load_shards("even/{00000..00003}.tar", data)
    _, full = epoch_batches(shards, 1, 0, 0, 2, 1, buffer=4)
    decoded, opened = [], []
    read_clip = VideoClipDataset._read_clip
    monkeypatch.setattr(
        VideoClipDataset, "_read_clip", staticmethod(lambda v, *a: decoded.append(v.name) or read_clip(v, *a))
    )
    import stanvid.data.shard_dataset as module

    iterate = module.iter_samples
    monkeypatch.setattr(module, "iter_samples", lambda url, **kw: opened.append(url) or iterate(url, **kw))
    _, tail = epoch_batches(shards, 1, 0, 0, 2, 1, start=4, buffer=4)
    assert len(tail) == len(full) - 4
    for a, b in zip(tail, full[4:], strict=True):
        assert a["video_id"] == b["video_id"] and torch.equal(a["video"], b["video"])
    assert sorted(decoded) == sorted(v for b in full[4:] for v in b["video_id"])  # the rest, nothing before
    done = {v.rpartition(":")[0] for b in full[:4] for v in b["video_id"]}
    left = {v.rpartition(":")[0] for b in full[4:] for v in b["video_id"]}
    assert set(opened) == left and done - left  # shards already trained on are not opened
    monkeypatch.undo()
    _, two = epoch_batches(shards, 1, 0, 2, 2, 1, start=3)  # with worker processes too
    _, whole = epoch_batches(shards, 1, 0, 2, 2, 1)
    assert [b["video_id"] for b in two] == [b["video_id"] for b in whole[3:]]


def _shard_recipe(root: Path, pattern: str, workers: int = 0, max_steps: int | None = None, **train):
    return recipe(
        data={
            "dataset": "webdataset",
            "root": str(root),
            "train_annotations": pattern,
            "num_workers": workers,
            "shuffle_buffer": 3,
        },
        train={
            "epochs": 2,
            "batch_size": 2,
            "temperature": "learnable",
            "checkpoint_every": 1,
            "max_steps": max_steps,
            **train,
        },
        optim={"lr": 1e-4, "accumulation_steps": 1, "warmup_epochs": 1.0},
    )


def test_a_resumed_run_reaches_the_uninterrupted_weights(data, tmp_path):
    pattern = "even/{00000..00003}.tar"
    full = fit(
        train_model(),
        build_dataset(_shard_recipe(data, pattern), "train"),
        _shard_recipe(data, pattern),
        out_dir=tmp_path / "full",
        progress=False,
    )
    assert full.steps == 12 and full.epochs == 2
    stopped = fit(
        train_model(),
        build_dataset(_shard_recipe(data, pattern), "train"),
        _shard_recipe(data, pattern, max_steps=8),
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert stopped.steps == 8 and stopped.epochs == 1  # two batches into the second epoch
    with pytest.raises(ConfigError, match="data.num_workers"):
        fit(
            train_model(),
            build_dataset(_shard_recipe(data, pattern, 2), "train"),
            _shard_recipe(data, pattern, 2),
            out_dir=tmp_path / "run",
            resume=True,
            progress=False,
        )
    resumed = fit(
        train_model(seed=4),
        build_dataset(_shard_recipe(data, pattern), "train"),
        _shard_recipe(data, pattern),
        out_dir=tmp_path / "run",
        resume=True,
        progress=False,
    )
    _assert_same_run(load_checkpoint(resumed.checkpoint), load_checkpoint(full.checkpoint))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for field, value in sample.items():
                if field != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                    info.size = len(value)
                    tar.addfile(info, io.BytesIO(value))


def test_damaged_samples_are_named_at_the_end_and_a_missing_shard_stops_the_run(data, tmp_path, capsys):
    good = [(data / "videos" / f"v{i:02d}.mp4").read_bytes() for i in range(6)]
    folder = tmp_path / "bad"
    folder.mkdir()
    _write_tar(
        folder / "a.tar",
        [
            {"__key__": "k0", "mp4": good[0], "txt": b"fine"},
            {"__key__": "broken", "mp4": b"not a video at all" * 20, "txt": b"bad video"},
            {"__key__": "k2", "mp4": good[2], "txt": b"fine too"},
        ],
    )
    _write_tar(
        folder / "b.tar",
        [
            {"__key__": "k3", "mp4": good[3], "txt": b"yes"},
            {"__key__": "nocaption", "mp4": good[4]},
            {"__key__": "k5", "mp4": good[5], "txt": b"last"},
        ],
    )
    run = _shard_recipe(tmp_path, "bad/{a,b}.tar", epochs=1)
    result = fit(train_model(), build_dataset(run, "train"), run, progress=False)
    assert result.steps == 3
    err = capsys.readouterr().err
    assert "2 video(s) skipped (2 sample(s))" in err
    assert f"{folder / 'a.tar'}:broken (x1): not a readable video" in err
    assert f"{folder / 'b.tar'}:nocaption (x1): no .txt caption" in err

    with pytest.raises(DatasetError, match=r"shard .*bad/c\.tar does not exist"):
        load_shards("bad/{a,b,c}.tar", tmp_path)
    _write_tar(folder / "c.tar", [{"__key__": "first", "mp4": b"\x00" * 64, "txt": b"a broken first sample"}])
    from stanvid.training.runs import check_run

    with pytest.raises(
        DatasetError, match=r"1 shard\(s\) whose first sample does not decode:\n  .*c\.tar:first: "
    ):
        check_run(_shard_recipe(tmp_path, "bad/{a,b,c}.tar", epochs=1))
    dataset = build_dataset(run, "train")
    (folder / "b.tar").unlink()  # gone after it was counted
    with pytest.raises(DatasetError, match=r"shard .*bad/b\.tar does not exist"):
        fit(train_model(), dataset, run, progress=False)


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clean = False
    try:
        _ddp_fit(Path(root), Path(out), batch_size=2, workers=0)
        clean = True
    finally:
        leave_process_group(clean)


def _ddp_fit(root: Path, out: Path, batch_size: int, workers: int):
    run = recipe(
        model={"classifier": "linear"},
        data={
            "dataset": "webdataset",
            "root": str(root),
            "train_annotations": "small/shards.json",
            "num_workers": workers,
            "shuffle_buffer": 2,
        },
        train={"epochs": 1, "batch_size": batch_size, "temperature": "learnable"},
        optim={"lr": 1e-4, "warmup_epochs": 0.0, "eps": 1e-3},
    )
    model = train_model(seed=3, stan={"drop_path": 0.0})
    _open_branch_outputs(model)
    return fit(model, build_dataset(run, "train"), run, out_dir=out, progress=False)


def _open_branch_outputs(model) -> None:
    """Give the branch's zero-initialised output projections small seeded weights. From zero, every branch
    parameter before them gets an exactly-zero gradient at step 1 and a rounding-sized one at step 2 (AdamW
    moments of ~1e-13 whose summation order decides their last digits), so the 2-rank and 1-process moments
    could differ beyond the tolerance by rounding alone (once in a few full runs: 8.8e-13 against 6.5e-13)."""
    g = torch.Generator().manual_seed(5)
    for module in model.temporal.modules():
        fc = getattr(module, "fc", None)
        if isinstance(fc, torch.nn.Linear) and not fc.weight.any():
            with torch.no_grad():
                fc.weight.normal_(0, 0.02, generator=g)


def test_two_gloo_ranks_train_on_shards_like_one_process_with_two_readers(data, tmp_path, free_port):
    mp.spawn(_ddp_worker, args=(2, free_port, str(data), str(tmp_path / "ddp")), nprocs=2, join=True)
    _ddp_fit(data, tmp_path / "one", batch_size=4, workers=2)
    assert_close_runs(
        load_checkpoint(latest_checkpoint(tmp_path / "ddp")),
        load_checkpoint(latest_checkpoint(tmp_path / "one")),
    )


def test_evaluation_reads_shards_as_the_files_they_were_written_from(data):
    fields = SampleFields("retrieval", caption_key="captions")
    ann = load_shard_annotations(load_shards("even/shards.json", data), fields)
    files = load_video_captions(data / "even.csv", data / "videos")
    assert ann.captions == files.captions and ann.text_to_video.tolist() == files.text_to_video.tolist()
    from_shards = RetrievalDataset(ann, num_frames=3, image_size=16, unit="video")
    from_files = RetrievalDataset(files, num_frames=3, image_size=16, unit="video")
    for i in (0, 7, 11):
        assert torch.equal(from_shards[i]["video"], from_files[i]["video"])
    assert (
        json.loads(tarfile.open(data / "even" / "00000.tar").extractfile("000000001.json").read())["video_id"]
        == "v01.mp4"
    )


def test_stanvid_shard_and_embed_on_shards(data, tmp_path, capsys):
    from indexkit import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "shards"
    args = ["shard", str(data / "small.csv"), str(data / "videos"), str(out), "--samples-per-shard", "3"]
    assert main(args) == 0 and "3 shards (3 written now" in capsys.readouterr().out
    assert main(args) == 0 and "(0 written now, 3 already complete)" in capsys.readouterr().out
    assert main([*args[:-1], "4"]) == 2
    assert "other settings: samples_per_shard=3 (now 4)" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".stanvid-shard.json").write_text("{not json")
    assert main([*args[:3], str(bad), *args[4:]]) == 2 and not list(bad.glob("*.tar"))
    assert f"{bad / '.stanvid-shard.json'}: unreadable manifest" in capsys.readouterr().err

    features = tmp_path / "f.npy"
    embed = [
        "embed",
        str(out / "{00000..00002}.tar"),
        "--model",
        str(model),
        "--out",
        str(features),
        "--workers",
        "0",
        "--no-progress",
        "--precision",
        "fp32",
    ]
    assert main(embed) == 0 and "wrote 8 rows" in capsys.readouterr().out
    vectors, rows = np.load(features), json.loads(features.with_suffix(".json").read_text())["rows"]
    files = tmp_path / "files.npy"  # second path: the index's embedding of the files the shards hold
    stanvid.embed_videos(data / "videos", files, str(model), num_workers=0, progress=False, precision="fp32")
    by_path = {
        r["path"]: v
        for r, v in zip(
            json.loads(files.with_suffix(".json").read_text())["rows"], np.load(files), strict=True
        )
    }
    for row, vector in zip(rows, vectors, strict=True):
        source = json.loads(tarfile.open(row["shard"]).extractfile(f"{row['key']}.json").read())["source"]
        np.testing.assert_allclose(vector, by_path[source], atol=1e-6)
    if (
        importlib.util.find_spec("pyarrow") is not None
    ):  # the [test] extra has it; parquet is the other format
        import pyarrow.parquet as pq

        table_out = tmp_path / "f.parquet"
        assert main([*embed[:5], str(table_out), *embed[6:]]) == 0
        table = pq.read_table(table_out)
        assert table["key"].to_pylist() == [r["key"] for r in rows]
        np.testing.assert_array_equal(np.stack(table["vector"].to_numpy(zero_copy_only=False)), vectors)
    (features.with_name("f.npy.parts") / "00001.json").unlink()  # as if stopped before shard 1 was written
    assert main(embed) == 0 and "(1 shards encoded now)" in capsys.readouterr().out
    assert np.array_equal(np.load(features), vectors)
    (features.with_name("f.npy.parts") / "manifest.json").write_text("{damaged")  # the parts are a cache:
    assert (
        main(embed) == 0 and "(3 shards encoded now)" in capsys.readouterr().out
    )  # a damaged one starts over
    assert np.array_equal(np.load(features), vectors)
    for flag, value, message in (
        ("--segment-seconds", "2", "shards are embedded one row per sample"),
        ("--shard", "0/2", "give each machine its own shards"),
    ):  # options of a folder's embedding, refused for shards in one line naming the option
        assert main([*embed, flag, value]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"stanvid embed: error: {flag}:")
            and message in err
            and len(err.strip().splitlines()) == 1
        )


def test_pipe_shards_stream_like_local_files(data):
    local = load_shards("even/{00000..00003}.tar", data)
    piped = load_shards(f"pipe:cat {data}/even/{{00000..00003}}.tar")  # counted by streaming each once
    assert piped.counts == local.counts
    _, a = epoch_batches(local, 1, 0, 0, 3, 0)
    _, b = epoch_batches(piped, 1, 0, 0, 3, 0)
    assert [[v.rpartition(":")[2] for v in x["video_id"]] for x in a] == [
        [v.rpartition(":")[2] for v in x["video_id"]] for x in b
    ]
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b, strict=True))


def test_recognition_shards_from_a_kinetics_list_reencoded_with_a_frame_folder(data, tmp_path, capsys):
    from PIL import Image

    videos = tmp_path / "k400"
    (videos / "frames_clip").mkdir(parents=True)
    for i, frame in enumerate(make_frames(6, 32, 48, seed=9)):
        Image.fromarray(frame).save(videos / "frames_clip" / f"img_{i + 1:05d}.png")
    for i in range(3):
        (videos / f"c{i}.mp4").write_bytes((data / "videos" / f"v{i:02d}.mp4").read_bytes())
    (tmp_path / "classes.txt").write_text("abseiling\nair drumming\n")
    (tmp_path / "list.txt").write_text("c0.mp4 1\nc1.mp4 abseiling\nframes_clip 6 1\nc2.mp4 0\n")
    out = tmp_path / "shards"
    argv = [
        "shard",
        str(tmp_path / "list.txt"),
        str(videos),
        str(out),
        "--dataset",
        "kinetics400",
        "--class-names",
        str(tmp_path / "classes.txt"),
        "--samples-per-shard",
        "2",
        "--reencode",
        "--fps",
        "5",
        "--short-side",
        "32",
        "--frame-rate",
        "12",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    shards = load_shards("shards.json", out)
    by_cls = SampleFields("recognition", classes=["abseiling", "air drumming"])
    by_json = SampleFields("recognition", label_key="label_name", classes=["abseiling", "air drumming"])
    for fields in (by_cls, by_json):
        ann = load_shard_annotations(shards, fields)
        assert ann.labels.tolist() == [1, 0, 1, 0]
    folder = stanvid.probe(load_shard_annotations(shards, by_cls).video_source(2))
    assert (folder.num_frames, folder.fps, min(folder.width, folder.height)) == (
        3,
        5.0,
        32,
    )  # 6 at 12 fps -> 5 fps
    run = recipe(
        "recognition",
        data={
            "dataset": "webdataset",
            "root": str(out),
            "train_annotations": "shards.json",
            "class_names": str(tmp_path / "classes.txt"),
            "shuffle_buffer": 2,
        },
    )
    batch = next(iter(ShardLoader(build_dataset(run, "train"), 2, epochs=1)))
    assert sorted(batch["label"].tolist()) in ([0, 1], [1, 1], [0, 0]) and batch["video"].shape[1:] == (
        4,
        3,
        24,
        24,
    )

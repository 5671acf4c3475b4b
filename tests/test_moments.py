"""Moments: scoring and cutting on synthetic features, what the index keeps (and loses with its files), searches
that answer with a moment's bounds, the old-index message, cutting moments out of files (stream copy against
re-encoding, frame-exact, rotation kept), the API parameter, and the QVHighlights-style evaluation."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import stanvid
from indexkit import index_model, save_tiny_model
from stanvid.errors import QueryError, VideoReadError
from stanvid.search.index import build_index, open_index
from stanvid.search.moment_eval import average_precision, moment_metrics, temporal_iou
from stanvid.search.moment_export import export_moment, moment_file_name
from stanvid.search.moments import (
    cut_moments,
    moment_sample_times,
    moment_step,
    moment_windows,
    score_samples,
    smooth_scores,
)
from stanvid.video.decode import probe, read_frames
from videogen import frame_code, make_frames, remux_rotated, write_video


# ---------------------------------------------------------------------------------------------- scoring
def _features(n: int, spans: list[tuple[int, int, np.ndarray]], dim: int = 16, seed: int = 0) -> np.ndarray:
    """(n, dim) noisy unit vectors; samples in each [a, b) lean towards that span's direction."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim))
    for a, b, direction in spans:
        feats[a:b] += 6 * direction
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


@pytest.mark.parametrize("first,last", [(40, 52), (10, 31), (0, 9), (70, 80)])
def test_a_moment_is_cut_where_the_query_matches(first, last):
    """Samples first..last-1 match the query: the moment's bounds are within one step of that span, whatever
    its length and wherever it lies (at the file's start or end too)."""
    n, step = 80, 0.25
    query = np.eye(16)[3]
    times = moment_sample_times(n * step, step)
    scores = score_samples(query, _features(n, [(first, last, query)]))
    best = cut_moments(times, scores, n * step, step=step)[0]
    true_start, true_end = first * step, last * step
    assert abs(best.start - true_start) <= step and abs(best.end - true_end) <= step
    assert temporal_iou((best.start, best.end), (true_start, true_end)) >= 0.8
    assert true_start <= best.peak <= true_end


def test_moments_are_ranked_by_score_and_relative_to_the_file():
    """Two matching spans, one stronger: both are found, the stronger first; a constant offset of every score
    (another file's level) changes no bound."""
    n, step = 100, 0.25
    query = np.eye(16)[0]
    feats = _features(n, [(10, 20, query), (60, 75, 0.5 * query)])
    times = moment_sample_times(n * step, step)
    scores = score_samples(query, feats)
    found = cut_moments(times, scores, n * step, step=step, level=0.3)
    assert len(found) >= 2 and found[0].score > found[1].score
    assert 10 * step - step <= found[0].start < found[0].end <= 20 * step + step
    assert any(60 * step - step <= m.start and m.end <= 75 * step + step for m in found[1:])
    shifted = cut_moments(times, scores - 0.3, n * step, step=step, level=0.3)
    assert np.allclose([(m.start, m.end) for m in shifted], [(m.start, m.end) for m in found])


def test_flat_scores_are_the_whole_file_and_smoothing_keeps_the_mean():
    times = moment_sample_times(3.0, 0.5)
    assert times.tolist() == [0.25, 0.75, 1.25, 1.75, 2.25, 2.75]
    (whole,) = cut_moments(times, np.full(6, 0.2), 3.0, step=0.5)
    assert (whole.start, whole.end) == (0.0, 3.0)
    x = np.random.default_rng(0).normal(size=200)
    assert np.mean(smooth_scores(x, 2.0)[10:-10]) == pytest.approx(np.mean(x[10:-10]), abs=0.05)
    assert smooth_scores(np.full(9, 0.7), 3.0) == pytest.approx(np.full(9, 0.7))  # no fall-off at the ends


def test_a_duration_of_years_gets_no_moment_samples_and_costs_nothing():
    """A far timestamp makes two frames last years: the samples are counted, never listed, and the file gets
    none (it is indexed without moment features); a normal file's count is what its duration holds."""
    from stanvid.search.moments import MAX_MOMENT_SAMPLES, moment_sample_count

    times, idx = moment_windows(3.2e8, 2 / 3.2e8, 2, clip_len=8, step=0.125)
    assert len(times) == 0 and idx.shape == (0, 8)
    assert moment_sample_count(3.2e8, 0.125) > MAX_MOMENT_SAMPLES
    assert moment_sample_count(float("inf"), 0.125) > MAX_MOMENT_SAMPLES
    assert moment_sample_count(2.0, 0.125) == 16 and moment_sample_count(0.0, 0.125) == 0
    with pytest.raises(ValueError, match="at most"):
        moment_sample_times(3.2e8, 0.125)
    assert len(moment_sample_times(3.2e8, 0.125, limit=5)) == 5


def test_moment_windows_sample_the_frame_on_screen():
    """Sample j at (j + 0.5) * step shows frame floor(t * fps); samples are grouped into clips of clip_len,
    the last padded with its last frame."""
    times, idx = moment_windows(2.0, 10.0, 20, clip_len=4, step=0.25)
    assert len(times) == 8 and idx.shape == (2, 4)
    assert idx.ravel().tolist() == [int(t * 10) for t in times]
    times, idx = moment_windows(1.1, 10.0, 11, clip_len=4, step=0.25)
    assert len(times) == 5 and idx.shape == (2, 4) and idx.ravel()[5:].tolist() == [idx.ravel()[4]] * 3


# ---------------------------------------------------------------------------------------------- the index
def _scene(path, seconds: list[tuple[float, int]], fps: int = 10):
    """A video of flat-coloured stretches: [(seconds, grey level), ...], with a little noise."""
    rng = np.random.default_rng(1)
    frames = []
    for length, level in seconds:
        n = int(round(length * fps))
        base = np.zeros((n, 48, 64, 3), np.uint8) + np.array([level, 255 - level, level // 2], np.uint8)
        frames.append(np.clip(base + rng.integers(0, 6, size=base.shape), 0, 255).astype(np.uint8))
    return write_video(path, np.concatenate(frames), fps=fps, gop=10)


@pytest.fixture(scope="module")
def moment_index(tmp_path_factory):
    base = tmp_path_factory.mktemp("moments")
    root = base / "videos"
    root.mkdir()
    _scene(root / "scene.mp4", [(3.0, 30), (2.0, 220), (3.0, 30)])
    _scene(root / "other.mp4", [(4.0, 120)])
    model = save_tiny_model(base / "model")
    out = base / "idx"
    build_index(root, out, model, segment_seconds=2.0, num_workers=0, progress=False)
    return root, out, model


def test_the_index_keeps_each_files_per_frame_vectors(moment_index):
    """One float16 row per sample, equal to the model's per-frame vectors of the frames on screen at the
    sample times (computed here a second way: decoding those frames and running `encode_video(pool=False)`)."""
    import torch

    from stanvid.search.index.clips import _clip_frames
    from stanvid.video.transforms import normalize

    root, out, _ = moment_index
    with open_index(out, model=index_model(), follow=None) as index:
        fid = dict((rel, fid) for fid, rel in index.files())["scene.mp4"]
        step, duration, feats = index.moment_features([fid])[fid]
    info = probe(root / "scene.mp4")
    assert step == moment_step(4) == 0.25 and duration == pytest.approx(info.duration)
    times, idx = moment_windows(info.duration, info.fps, info.num_frames, 4, step)
    assert feats.shape == (len(times), 16) and feats.dtype == np.float16
    model = index_model()
    frames = _clip_frames(read_frames(root / "scene.mp4", idx.ravel(), size=32), 32)  # (m*T, 3, S, S)
    pre = model.config.clip.preprocess
    video = normalize(frames, pre.mean, pre.std).view(len(idx), 4, 3, 32, 32)
    with torch.inference_mode():
        ref = model.encode_video(video, pool=False).reshape(-1, 16)[: len(times)].numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    # the index encoded in its default precision (bf16 where the CPU has it): cosines, not bits
    cos = np.sum(ref * feats.astype(np.float32), axis=1)
    assert cos.min() > 0.98


def test_a_moments_search_bounds_the_matching_stretch(moment_index):
    """Querying with the vector of a sample inside the bright stretch (3-5 s) of `scene.mp4` gives that stretch,
    across the 2 s segment boundary at 4 s, with `pad` widening it; the plain search gives a fixed segment."""
    _, out, _ = moment_index
    with open_index(out, model=index_model(), follow=None) as index:
        fid = dict((rel, fid) for fid, rel in index.files())["scene.mp4"]
        query = index.moment_features([fid])[fid][2][16].astype(np.float32)  # the sample at 4.125 s
        query /= np.linalg.norm(query)
        (hit,) = stanvid.search.moments.search_moments(index, query, 1)
        assert hit.relpath == "scene.mp4" and temporal_iou((hit.start, hit.end), (3.0, 5.0)) >= 0.7
        assert index.segment(hit.id).start <= 4.125 < index.segment(hit.id).end  # the segment of its peak
        (padded,) = stanvid.search.moments.search_moments(index, query, 1, pad=0.5)
        assert padded.start == pytest.approx(max(0.0, hit.start - 0.5))
        assert padded.end == pytest.approx(min(8.0, hit.end + 0.5))
        assert index.moments_note() == ""
        with pytest.raises(QueryError, match="pad"):
            index.search("x", 1, moments=True, pad=-1)
        plain = index.search("a bright stretch", 3)
        assert all((h.end - h.start) <= 2.0 + 1e-9 for h in plain)
        assert len(index.search("a bright stretch", 3, moments=True)) == 3


def test_moments_follow_deletions_and_no_moments_and_old_indexes(moment_index, tmp_path):
    """A deleted file's row goes with it; `moments=False` keeps none and says so in one line; an index made
    before moments were kept (no table) still searches, with fixed segments, and says why."""
    root, _, model = moment_index
    import shutil

    videos = tmp_path / "v"
    shutil.copytree(root, videos)
    out = tmp_path / "idx"
    build_index(videos, out, model, num_workers=0, progress=False)
    (videos / "other.mp4").unlink()
    build_index(videos, out, model, num_workers=0, progress=False)
    with sqlite3.connect(out / "index.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM file_moments").fetchone()[0] == 1
        assert (
            conn.execute(
                "SELECT COUNT(*) FROM file_moments m JOIN files f ON f.id = m.file_id WHERE f.path = 'scene.mp4'"
            ).fetchone()[0]
            == 1
        )
    coarse = tmp_path / "coarse"  # clips of 2 s: 4 samples each, one every 0.5 s
    build_index(videos, coarse, model, num_workers=0, progress=False, moments=2.0)
    with open_index(coarse, follow=None) as index:
        step, duration, feats = next(iter(index.moment_features([f for f, _ in index.files()]).values()))
        assert step == moment_step(4, 2.0) == 0.5 and len(feats) == len(moment_sample_times(duration, 0.5))
    with pytest.raises(stanvid.VideoIndexError, match="must be True, False or a window"):
        build_index(videos, tmp_path / "x", model, progress=False, moments=-1.0)
    bare = tmp_path / "bare"
    build_index(videos, bare, model, num_workers=0, progress=False, moments=False)
    with open_index(bare, follow=None) as index:
        assert "--no-moments" in index.moments_note() and "\n" not in index.moments_note()
        hits = index.search("x", 1, moments=True)
        assert (hits[0].start, hits[0].end) == (0.0, pytest.approx(8.0))
    with sqlite3.connect(bare / "index.sqlite") as conn:
        conn.execute("DROP TABLE file_moments")
    with open_index(bare, follow=None) as index:
        assert "before `stanvid index` kept them" in index.moments_note()
        assert index.search("x", 1, moments=True)[0].relpath == "scene.mp4"
    run = subprocess.run(
        [sys.executable, "-m", "stanvid.cli", "search", str(bare), "x", "--moments", "-k", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "scene.mp4" in run.stdout
    assert len(run.stderr.strip().splitlines()) == 1 and "no moments in this index" in run.stderr


def _moment_rows(out) -> dict[str, tuple]:
    with sqlite3.connect(out / "index.sqlite") as conn:
        rows = conn.execute(
            "SELECT f.path, m.step, m.count, m.dim, m.features FROM file_moments m JOIN files f ON f.id = m.file_id"
        ).fetchall()
    return {path: rest for path, *rest in rows}


def test_moments_survive_a_shard_merge(moment_index, tmp_path):
    """The files a rank's shard holds are merged with their moment rows, byte for byte."""
    import shutil

    from stanvid.search.index import DB_NAME, SHARD_DIR

    root, complete, model = moment_index
    out = tmp_path / "idx"
    (out / SHARD_DIR).mkdir(parents=True)
    shutil.copy(complete / DB_NAME, out / SHARD_DIR / "rank-00001.sqlite")  # a finished index stands in
    for store in complete.glob("embeddings-*.f32"):
        shutil.copy(store, out / SHARD_DIR / store.name)
    report = build_index(root, out, model, segment_seconds=2.0, num_workers=0, progress=False)
    assert report.indexed == 0 and report.files == 2
    assert _moment_rows(out) == _moment_rows(complete) and len(_moment_rows(out)) == 2


def test_cli_moments_export(moment_index, tmp_path):
    """`stanvid search --moments --pad --export DIR` prints the library's moments and writes each as a file named
    after its source and times; --export without --moments is refused in one line."""
    _, out, _ = moment_index
    cli = [sys.executable, "-m", "stanvid.cli", "search", str(out), "a green screen"]
    run = subprocess.run([*cli, "--moments", "--pad", "0.5", "-k", "2", "--export", str(tmp_path / "cuts"), "--json"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    hits = json.loads(run.stdout)
    with open_index(out, follow=None) as index:
        expected = index.search("a green screen", 2, moments=True, pad=0.5)
    assert np.allclose(
        [(h["start"], h["end"]) for h in hits], [(e.start, e.end) for e in expected], atol=1e-3
    )
    written = sorted(p.name for p in (tmp_path / "cuts").iterdir())
    names = sorted(moment_file_name(h["path"], h["start"], h["end"]) for h in hits)
    assert written == names and run.stderr.count("wrote ") == 2
    refused = subprocess.run([*cli, "--export", str(tmp_path / "x")], capture_output=True, text=True)
    assert refused.returncode == 2 and "--moments" in refused.stderr and "Traceback" not in refused.stderr


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """40 frames at 10 fps, a keyframe every 10 frames, B-frames; each frame carries its index (`frame_code`)."""
    base = tmp_path_factory.mktemp("coded")
    src = write_video(base / "src.mp4", make_frames(40, 64, 96, seed=1), fps=10, gop=10, bframes=2)
    return src, remux_rotated(src, base / "portrait.mp4", 90)


def _codes(path) -> list[int]:
    frames = read_frames(path, np.arange(probe(path).num_frames)).numpy()
    return [frame_code(f) for f in frames]


@pytest.mark.parametrize(
    "start,end,method",
    [
        (1.0, 3.0, "copy"),
        (0.0, 4.0, "copy"),
        (2.0, 4.0, "copy"),
        (1.25, 2.55, "encode"),
        (1.0, 2.5, "encode"),
    ],
)
def test_export_is_frame_exact_copying_on_keyframes_and_reencoding_otherwise(
    coded, tmp_path, start, end, method
):
    src, _ = coded
    cut = export_moment(src, start, end, tmp_path)
    expected = [i for i in range(40) if start - 1e-6 <= i / 10 < end - 1e-6]
    assert cut.method == method and cut.path.name == moment_file_name(src, start, end)
    assert _codes(cut.path) == expected
    assert (cut.first, cut.frames) == (expected[0], len(expected))
    if method == "copy":  # the packets unchanged: the frames decode bit-identically
        whole = read_frames(src, expected).numpy()
        assert np.array_equal(read_frames(cut.path, np.arange(len(expected))).numpy(), whole)


@pytest.mark.parametrize("start,end", [(1.0, 3.0), (1.3, 2.0)])
def test_export_keeps_the_rotation(coded, tmp_path, start, end):
    _, portrait = coded
    cut = export_moment(portrait, start, end, tmp_path)
    info = probe(cut.path)
    assert info.rotation == 90 and (info.width, info.height) == (64, 96)
    assert cut.frames == probe(cut.path).num_frames == len([i for i in range(40) if start <= i / 10 < end])


def test_export_refuses_an_empty_span(coded, tmp_path):
    src, _ = coded
    with pytest.raises(VideoReadError, match="no frame"):
        export_moment(src, 10.0, 11.0, tmp_path)
    with pytest.raises(VideoReadError, match="empty"):
        export_moment(src, 2.0, 2.0, tmp_path)


# ---------------------------------------------------------------------------------------------- the API
def test_the_api_answers_moments_and_cuts_them(moment_index):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from stanvid.search.server.app import create_app

    root, out, _ = moment_index
    with TestClient(create_app(out), raise_server_exceptions=False) as client:
        body = client.get(
            "/api/search", params={"q": "a green screen", "k": 3, "moments": "true", "pad": 0.25}
        ).json()
        with open_index(out, follow=None) as index:
            expected = index.search("a green screen", 3, moments=True, pad=0.25)
        assert body["moments"] is True and body["moments_note"] is None
        assert [h["file_id"] for h in body["results"]] == [e.file_id for e in expected]
        got = [(h["start"], h["end"]) for h in body["results"]]
        assert np.allclose(got, [(e.start, e.end) for e in expected], atol=1e-3)
        hit = body["results"][0]
        assert hit["duration"] == pytest.approx(probe(root / hit["path"]).duration)
        assert hit["play_url"].endswith(f"#t={hit['start']:.3f},{hit['end']:.3f}")
        cut = client.get(hit["export_url"])
        assert cut.status_code == 200 and cut.headers["content-type"] == "video/mp4"
        assert "attachment" in cut.headers["content-disposition"]
        like = client.get(f"/api/like/{hit['id']}", params={"moments": "true"}).json()
        assert like["moments"] is True and len(like["results"]) >= 1
        plain = client.get("/api/search", params={"q": "a green screen"}).json()
        assert (
            plain.get("moments") is None
            and "export_url" not in plain["results"][0]
            or not plain["results"][0]["export_url"]
        )
        assert client.get("/api/search", params={"q": "x", "moments": "true", "pad": -1}).status_code == 400
        assert client.get(f"/api/moment/{hit['file_id']}", params={"start": 3, "end": 2}).status_code == 409
        assert client.get("/api/moment/999", params={"start": 0, "end": 1}).status_code == 404


# ---------------------------------------------------------------------------------------------- evaluation
def _reference_ap(truth, preds, t):
    """AP@t written out the long way (precision at each true positive's rank, made monotone, summed over the
    recall it adds)."""
    preds = sorted(preds[:10], key=lambda p: -p[2])
    free = list(range(len(truth)))
    flags = []
    for p in preds:
        best = max(free, key=lambda j: temporal_iou(p, truth[j]), default=None)
        ok = best is not None and temporal_iou(p, truth[best]) >= t
        flags.append(ok)
        if ok:
            free.remove(best)
    prec = [sum(flags[: i + 1]) / (i + 1) for i in range(len(flags))]
    total = 0.0
    for i, ok in enumerate(flags):
        if ok:
            total += max(prec[i:]) / len(truth)
    return total


def test_average_precision_matches_a_second_implementation():
    rng = np.random.default_rng(0)
    for _ in range(200):
        truth = [tuple(sorted(rng.uniform(0, 30, 2))) for _ in range(rng.integers(1, 3))]
        preds = [(*sorted(rng.uniform(0, 30, 2)), float(rng.random())) for _ in range(rng.integers(0, 12))]
        for t in (0.3, 0.5, 0.75):
            assert average_precision(truth, preds, t) == pytest.approx(_reference_ap(truth, preds, t))


def test_metrics_by_definition():
    truth = [[(10.0, 20.0)], [(0.0, 4.0)]]
    preds = [[(11.0, 19.0, 0.9)], [(2.0, 8.0, 0.9), (0.0, 4.0, 0.8)]]  # IoU 0.8; IoU 0.25 then exact
    m = moment_metrics(truth, preds)
    assert m["R1@0.5"] == 50.0 and m["R1@0.7"] == 50.0
    assert m["mAP@0.5"] == pytest.approx(100 * (1.0 + 0.5) / 2)  # the second query: its hit at rank 2
    assert m["mIoU"] == pytest.approx((0.8 + 2 / 8) / 2)


def test_eval_moments_on_a_generated_set(moment_index, tmp_path):
    """`stanvid eval-moments` on a QVHighlights-format file over the test videos: the windows it predicts are
    the library's moments of each query's own video, and its figures are `moment_metrics` of them."""
    root, _, model = moment_index
    ann = tmp_path / "ann.jsonl"
    rows = [
        {
            "qid": 1,
            "query": "a green screen",
            "vid": "scene",
            "duration": 8.0,
            "relevant_windows": [[3.0, 5.0]],
        },
        {"qid": 2, "query": "grey", "vid": "other", "duration": 4.0, "relevant_windows": [[0, 4.0]]},
        {"qid": 3, "query": "lost", "vid": "missing", "duration": 4.0, "relevant_windows": [[1, 2]]},
    ]
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = tmp_path / "preds.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "stanvid.cli", "eval-moments", str(ann), str(root), "--model", str(model),
         "--predictions", str(preds), "--index", str(tmp_path / "idx"), "--no-progress"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    got = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [g["qid"] for g in got] == [1, 2, 3] and got[2]["pred_relevant_windows"] == []
    with open_index(tmp_path / "idx", follow=None) as index:
        fid = dict((rel, fid) for fid, rel in index.files())["scene.mp4"]
        query = index.embed_text(["a green screen"])[0]
        ref = stanvid.search.moments.file_moments(index, fid, query, limit=10)
    assert np.allclose(got[0]["pred_relevant_windows"], [[m.start, m.end, m.score] for m in ref], atol=1e-3)
    metrics = moment_metrics([r["relevant_windows"] for r in rows], [g["pred_relevant_windows"] for g in got])
    assert (
        f"R1@0.5 {metrics['R1@0.5']:.2f}" in run.stdout
        and f"mAP@0.75 {metrics['mAP@0.75']:.2f}" in run.stdout
    )
    assert "1 queries without their video" in run.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "relevant_windows": [[5, 3]]}) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "stanvid.cli", "eval-moments", str(bad), str(root), "--model", str(model)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "line 1" in run.stderr and "relevant_windows" in run.stderr
    assert "Traceback" not in run.stderr

"""Runtimes on this CPU: PyTorch (fp32, bf16 where the CPU has it, int8) against the ONNX export run by
onnxruntime (fp32, int8 = its dynamic quantization) and OpenVINO (when its package is installed), per clip and
per query, with the peak memory of each.

    python benchmarks/runtimes.py                      # ViT-B/32 + STAN-4, 12 frames, random weights
    python benchmarks/runtimes.py --clips 5 --queries 30

The model is saved once and exported once (`stanvid.export_onnx`); each runtime then runs in a fresh process of
its own, so its peak memory (`VmHWM`: the process's whole footprint, libraries and weights included) is
its own. The rows run in turn, `--rounds` times interleaved, and each row keeps its best round. The PyTorch rows run `stanvid.load_model` + `stanvid.prepare_for_inference` (what `stanvid index` and
`search` run); the onnxruntime and OpenVINO rows run the exported graphs from numpy and never import torch,
which is what a service without PyTorch pays. A clip is one (1, 12, 3, 224, 224) video, a query one caption of
77 token ids; each figure is the median of the timed calls after one warm-up call. Every row's clip embedding
is compared with PyTorch fp32's on the same input (cosine). All rows use the same number of threads (torch's
default here). The machine is shared: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = ("torch-fp32", "torch-bf16", "torch-int8", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32")
CAPTION = "a person slices bread on a wooden board in a sunny kitchen"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B/32")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--clips", type=int, default=5, help="timed clips per row (after one warm-up)")
    p.add_argument("--queries", type=int, default=20, help="timed queries per row (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the rows, interleaved (best one kept)")
    p.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: every core)")
    p.add_argument("--work", default=None, help="keep the model and export here (reused when present)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args()
    if args.one:
        if args.threads:
            os.environ["STANVID_BENCH_THREADS"] = str(args.threads)
        print(json.dumps(run_row(args.one, Path(args.work), args.clips, args.queries)))
        return
    with tempfile.TemporaryDirectory(prefix="stanvid-runtimes-") as tmp:
        work = Path(args.work or tmp)
        if not (work / "ids.npy").exists():
            prepare(work, args.arch, args.frames)
        results: dict[str, dict] = {}
        for r in range(args.rounds):  # interleaved: a busy spell of the machine slows every row alike
            for row in ROWS:
                found = child(row, work, args)
                print(f"  round {r + 1} {row}: {found.get('error') or 'done'}", file=sys.stderr)
                results[row] = _better(results.get(row), found)
        report(results, work, args)


def _better(old: dict | None, new: dict) -> dict:
    """The faster of two rounds (load on a shared machine only adds time), with the larger peak memory."""
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    best = {k: min(old[k], new[k]) for k in ("clip_s", "query_s")}
    return {**old, **best, "peak_bytes": max(old["peak_bytes"], new["peak_bytes"])}


# ---------------------------------------------------------------------------------------------- set-up
def prepare(work: Path, arch: str, frames: int) -> None:
    """The model folder, its fp32 export, int8 twins of its graphs, and the fixed inputs every row encodes."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import stanvid

    torch.manual_seed(0)
    model = stanvid.create_model(arch, temporal="stan", num_frames=frames)
    model.save_pretrained(work / "model")
    t = time.perf_counter()
    stanvid.export_onnx(work / "model", work / "export")
    print(f"export: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    (work / "int8").mkdir()
    for name in ("video_encoder.onnx", "text_encoder.onnx"):
        # onnxruntime's dynamic quantization, as `stanvid export --precision int8` and `--runtime onnxruntime
        # --precision int8` apply it: int8 weights per tensor, activations quantized per batch
        quantize_dynamic(work / "export" / name, work / "int8" / name, weight_type=QuantType.QInt8)
    cfg = model.config
    size = cfg.clip.vision.image_size
    clip = torch.randn(1, frames, 3, size, size, generator=torch.Generator().manual_seed(1))
    np.save(work / "clip.npy", clip.numpy())
    ids = stanvid.tokenize([CAPTION], context_length=cfg.clip.text.context_length)
    np.save(work / "ids.npy", ids.numpy())


def child(row: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", row, "--work", str(work)]
    cmd += ["--clips", str(args.clips), "--queries", str(args.queries)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- one row
def run_row(row: str, work: Path, clips: int, queries: int) -> dict:
    runtime, precision = row.rsplit("-", 1)
    clip, ids = np.load(work / "clip.npy"), np.load(work / "ids.npy")
    encode_clip, encode_query, threads = {
        "torch": torch_encoders,
        "onnxruntime": ort_encoders,
        "openvino": openvino_encoders,
    }[runtime](work, precision)
    emb = np.asarray(encode_clip(clip), dtype=np.float32)  # warm-up, and the embedding compared
    encode_query(ids)
    np.save(work / f"{row}.npy", emb)
    clip_s = _median(lambda: encode_clip(clip), clips)
    query_s = _median(lambda: encode_query(ids), queries)
    return {"clip_s": clip_s, "query_s": query_s, "peak_bytes": _peak_rss(), "threads": threads}


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM: of this executable, where ru_maxrss would carry the peak
    of the process that started it across exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _median(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torch_encoders(work: Path, precision: str):
    import torch

    import stanvid

    torch.set_num_threads(_threads())
    if precision == "bf16" and stanvid.resolve_precision("auto", "cpu") != "bf16":  # no native bf16 here
        raise SystemExit("skipped: this CPU has no native bf16")
    runner = stanvid.prepare_for_inference(stanvid.load_model(work / "model"), precision, "cpu")

    @torch.inference_mode()
    def clip(x):
        with runner.autocast():
            return runner.model.encode_video(torch.from_numpy(x)).float().numpy()

    @torch.inference_mode()
    def query(ids):
        with runner.autocast():
            return runner.model.encode_text(torch.from_numpy(ids)).float().numpy()

    return clip, query, torch.get_num_threads()


def _threads() -> int:
    """--threads, else the usable cores (torch's default intra-op thread count on Linux)."""
    return int(os.environ.get("STANVID_BENCH_THREADS") or len(os.sched_getaffinity(0)))


def ort_encoders(work: Path, precision: str):
    import onnxruntime as ort

    folder = work / ("export" if precision == "fp32" else "int8")
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    video = ort.InferenceSession(
        str(folder / "video_encoder.onnx"), options, providers=["CPUExecutionProvider"]
    )
    text = ort.InferenceSession(
        str(folder / "text_encoder.onnx"), options, providers=["CPUExecutionProvider"]
    )
    return (
        lambda x: video.run(["video_embeds"], {"frames": x})[0],
        lambda ids: text.run(["text_embeds"], {"input_ids": ids})[0],
        _threads(),
    )


def openvino_encoders(work: Path, precision: str):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": _threads(), "INFERENCE_PRECISION_HINT": "f32"}
    video = core.compile_model(str(work / "export" / "video_encoder.onnx"), "CPU", config)
    text = core.compile_model(str(work / "export" / "text_encoder.onnx"), "CPU", config)
    return (
        lambda x: video({"frames": x})[video.output("video_embeds")],
        lambda ids: text({"input_ids": ids})[text.output("text_embeds")],
        _threads(),
    )


# ---------------------------------------------------------------------------------------------- report
def report(results: dict, work: Path, args: argparse.Namespace) -> None:
    ref = np.load(work / "torch-fp32.npy") if (work / "torch-fp32.npy").exists() else None
    done = {r: v for r, v in results.items() if "error" not in v}
    torch_rows = [r for r in done if r.startswith("torch")]
    best = min(torch_rows, key=lambda r: done[r]["clip_s"]) if torch_rows else None
    best_query = min(torch_rows, key=lambda r: done[r]["query_s"]) if torch_rows else None
    threads = next((v["threads"] for v in done.values()), None)
    print(
        f"{args.arch} + STAN-4, {args.frames} frames, random weights, {threads} thread(s) each; per clip (1 video) and per query (1 caption), "
        f"median of {args.clips} clips / {args.queries} queries; best PyTorch CPU path here: {best} per clip, "
        f"{best_query} per query"
    )
    print(
        "| runtime | per clip (s) | clips/s | vs best PyTorch | per query (ms) | vs best PyTorch | peak memory "
        "(MiB) | cosine to torch fp32 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row, v in results.items():
        if "error" in v:
            print(f"| {row} | {v['error']} | | | | | | |")
            continue
        emb = np.load(work / f"{row}.npy")
        cos = (
            float((emb * ref).sum() / np.linalg.norm(emb) / np.linalg.norm(ref))
            if ref is not None
            else float("nan")
        )
        b, q = done[best], done[best_query]
        print(
            f"| {row} | {v['clip_s']:.3f} | {1 / v['clip_s']:.2f} | {b['clip_s'] / v['clip_s']:.2f}x | "
            f"{1000 * v['query_s']:.1f} | {q['query_s'] / v['query_s']:.2f}x | {v['peak_bytes'] / 2**20:.0f} | "
            f"{cos:.5f} |"
        )


if __name__ == "__main__":
    main()

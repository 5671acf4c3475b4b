"""`stanvid export MODEL OUT [--opset N] [--precision fp32|fp16|int8]`: a model as ONNX graphs for onnxruntime,
TensorRT, OpenVINO or any client without PyTorch (`stanvid.export_onnx`)."""

from __future__ import annotations

from stanvid.cli.common import add_model_overrides, parse_overrides


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (video, image and text encoders, tokenizer, manifest)",
        description="Write video_encoder.onnx, image_encoder.onnx, text_encoder.onnx, the tokenizer files and "
        "stanvid_export.json (everything a client needs: frames, input size, preprocessing, tokenizer, pooling, "
        "logit scale, fingerprint) into OUT. Every graph is checked with onnx.checker and run once in "
        "onnxruntime against PyTorch before the command reports success. `stanvid.load_model(OUT)` and "
        "`--model OUT` run the export in onnxruntime.",
    )
    p.add_argument(
        "model", help="any model stanvid.load_model reads (a stanvid folder, Hugging Face, OpenAI, ...)"
    )
    p.add_argument("out", help="output folder (must not exist, or be empty)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 18 or higher (default 18)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="fp32 (the reference), fp16 (half weights, float32 inputs and outputs: for GPUs / TensorRT) or "
        "int8 (onnxruntime's dynamic quantization, for CPUs) (default fp32)",
    )
    add_model_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.checkpoints.export_onnx import DEFAULT_OPSET
    from stanvid.checkpoints.load import export_onnx

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    manifest = export_onnx(
        args.model, args.out, opset=opset, precision=args.precision, **parse_overrides(args.overrides)
    )
    cfg = manifest["model_config"]
    print(
        f"stanvid export: {args.out}: {manifest['precision']}, opset {manifest['opset']}, {cfg['temporal']}, "
        f"{manifest['frames']} frames of {manifest['input_size']} px, embeddings of {manifest['embed_dim']}, "
        f"fingerprint {manifest['model_fingerprint'][:12]}"
    )
    for name, size in manifest["files"].items():
        print(f"  {name:40s} {size / 2**20:9.1f} MiB")
    check = manifest["check"]
    worst = max(v["max_relative_difference"] for k, v in check.items() if isinstance(v, dict))
    cosine = min(v["min_cosine"] for k, v in check.items() if isinstance(v, dict))
    print(
        f"  checked: onnx.checker passed; onnxruntime against PyTorch on a batch of {check['batch']}: max relative "
        f"difference {worst:.1e}, min cosine {cosine:.6f}"
    )
    return 0

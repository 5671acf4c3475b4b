"""`stanvid push DIR REPO`: a stanvid model folder, with a model card, to a Hugging Face hub repository."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "push",
        help="upload a stanvid model folder and a model card to the Hugging Face hub",
        description="Upload DIR (config.json + model.safetensors, as save_pretrained and training write it) "
        "and a README.md model card to the hub repository REPO (created if needed). The card lists the "
        "config and, when DIR or its parent holds eval.json (a training run's folder), the metrics. "
        "Needs huggingface_hub (pip install 'stanvid[hub]') and a token (hf auth login or HF_TOKEN).",
    )
    p.add_argument("dir", help="stanvid model folder, e.g. runs/stan_msrvtt_b32/model")
    p.add_argument("repo", help="hub repository id, owner/name")
    p.add_argument("--run-dir", help="folder holding the run's eval.json (default: DIR, then its parent)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.training.publish import push_to_hub

    url = push_to_hub(args.dir, args.repo, run_dir=args.run_dir, private=args.private)
    print(f"pushed {args.dir} to {url}")
    print(f"load it with: stanvid.load_model({args.repo!r})")
    return 0

"""`stanvid demo`: what temporal modeling buys, end to end, on a generated corpus, in minutes on a CPU.

- `synth`: the video-text corpus (real encoded files + caption CSVs), appearance and order-only captions.
- `pretrain`: image-text pretraining of a small CLIP on single frames with appearance captions.
- `run`: data -> pretraining -> transfer with each temporal module -> evaluation -> report (`run_demo`).
- `report`: results.json, report.md, the bar chart and the contact sheet.

May import: every layer of the library (it is a user of it), never the CLI.
"""

__all__ = ["DemoConfig", "run_demo"]


def __getattr__(name: str):
    if name in __all__:
        from stanvid.demo import run

        return getattr(run, name)
    raise AttributeError(f"module 'stanvid.demo' has no attribute {name!r}")

"""Helpers the training tests share (test_train, test_mug_train): the tiny model and recipe they train, and the
comparison of a 2-rank run with a 1-process run. Imported as `from trainkit import ...`."""

from __future__ import annotations

import torch

from stanvid.models.video_clip import VideoCLIP
from stanvid.training.recipe import Recipe
from testkit import tiny_config

FRAMES, SIZE, CONTEXT = 4, 24, 16


class MemoryRetrieval(torch.utils.data.Dataset):
    """Random clips and full-length captions; also serves as a test split (one item per video,
    ``text_tokens``)."""

    unit = "video"

    def __init__(self, n: int, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.videos = torch.randn(n, FRAMES, 3, SIZE, SIZE, generator=g)
        self.tokens = self._captions(n, g)
        self.text_to_video = torch.arange(n)

    @staticmethod
    def _captions(n: int, g: torch.Generator) -> torch.Tensor:
        tokens = torch.randint(1, 4000, (n, CONTEXT), generator=g)
        tokens[:, 0], tokens[:, -1] = 49406, 49407
        return tokens

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.videos[i], "tokens": self.tokens[i]}

    def text_tokens(self) -> torch.Tensor:
        return self.tokens


class PaddedRetrieval(MemoryRetrieval):
    """Random clips and captions of random lengths (start, words, end-of-text, zero padding)."""

    @staticmethod
    def _captions(n: int, g: torch.Generator) -> torch.Tensor:
        tokens = torch.zeros(n, CONTEXT, dtype=torch.long)
        for i, length in enumerate(torch.randint(1, CONTEXT - 1, (n,), generator=g).tolist()):
            tokens[i, 0] = 49406
            tokens[i, 1 : 1 + length] = torch.randint(1, 4000, (length,), generator=g)
            tokens[i, 1 + length] = 49407
        return tokens


def train_model(seed: int = 0, **kw) -> VideoCLIP:
    """A tiny seeded model in training mode, sized for FRAMES frames of SIZE pixels."""
    torch.manual_seed(seed)
    return VideoCLIP(tiny_config(frames=FRAMES, image=SIZE, **kw))


def recipe(task: str = "retrieval", **sections) -> Recipe:
    """A two-epoch float32 recipe for `train_model` on a captions (or class-list) dataset; `sections` override
    the recipe's sections key by key."""
    data = {
        "dataset": "captions",
        "num_frames": FRAMES,
        "input_size": SIZE,
        "test_resize": SIZE,
        "train_resize": 28,
        "text_length": CONTEXT,
        "num_workers": 0,
    }
    if task == "recognition":
        data["class_names"] = "classes.txt"
    data.update(sections.pop("data", {}))
    train = {"epochs": 2, "batch_size": 4, "log_every": 1, "precision": "fp32"}
    train.update(sections.pop("train", {}))
    optim = {"warmup_epochs": 1.0}
    optim.update(sections.pop("optim", {}))
    return Recipe.from_dict({"task": task, "data": data, "train": train, "optim": optim, **sections})


def _named(what: str):
    """An `assert_close` message that keeps torch's own (how many elements, the largest differences)."""
    return lambda message: f"{what}: {message}"


def _parameter_names(state: dict) -> dict[int, str]:
    """Optimizer state index -> parameter name, where the checkpoint's param groups record them in order
    (``names``, as `stanvid.training.trainer.param_groups` writes them, or torch's own ``param_names``)."""
    groups = state["trainer"]["optimizer"].get("param_groups", [])
    names: dict[int, str] = {}
    for group in groups:
        recorded = group.get("names", group.get("param_names", []))
        for index, name in zip(group.get("params", []), recorded, strict=False):
            names[index] = name
    return names


def assert_close_runs(ddp_state: dict, one_state: dict) -> None:
    """Weights, head and AdamW moments of a 2-rank run equal those of one process on the whole batch; a
    difference is reported with the parameter's name, torch's count of mismatched elements and the largest
    absolute and relative difference."""
    assert ddp_state["step"] == one_state["step"] == 2
    for key, value in one_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][key], value, rtol=1e-5, atol=1e-7, msg=_named(key))
    for key, value in (one_state["trainer"]["head"] or {}).items():
        torch.testing.assert_close(
            ddp_state["trainer"]["head"][key], value, rtol=1e-5, atol=1e-7, msg=_named(f"head {key}")
        )
    # AdamW's moments after the steps are the (clipped) gradients: the same on 2 ranks as on 1
    names = _parameter_names(one_state)
    for index, state in one_state["trainer"]["optimizer"]["state"].items():
        other = ddp_state["trainer"]["optimizer"]["state"][index]
        for name in ("exp_avg", "exp_avg_sq"):
            scale = float(state[name].abs().max())
            torch.testing.assert_close(
                other[name],
                state[name],
                rtol=1e-4,
                atol=1e-5 * scale + 1e-20,
                msg=_named(f"optimizer state {index} ({names.get(index, '?')}) {name}"),
            )

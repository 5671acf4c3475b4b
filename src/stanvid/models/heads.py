"""Recognition classifiers on top of the video embedding: the class names' text embeddings, and a linear head
initialised from them.

The official recognizer scores a video against its class names encoded by the (frozen) text encoder
(`encode_class_names`, with `stanvid.training.losses.text_classifier_logits`); `LinearHead` is the trainable
alternative (``model.classifier: linear``) that starts from exactly that zero-shot classifier. `eval_mode` is
the one way stanvid evaluates a model that may be training: eval mode inside, the caller's mode after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stanvid.errors import ConfigError

__all__ = ["LinearHead", "encode_class_names", "eval_mode"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode for ``modules`` inside (no drop-path or dropout: evaluation and the class-name embeddings
    must not depend on the training randomness), each module's previous mode restored after, also on error.
    ``None`` entries (no linear head) are ignored."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(present, modes, strict=True):
            m.train(training)


@torch.no_grad()
def encode_class_names(
    model: nn.Module,
    class_names: Sequence[str],
    context_length: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(K, D)`` L2-normalized text embeddings of the class names, encoded once in eval mode, no gradient.

    The official recognizer encodes the names with its text encoder and caches them; they stay fixed while the
    video side trains.
    """
    from stanvid.models.tokenizer import tokenize

    if not class_names:
        raise ConfigError("recognition needs the class names (none given)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tok = getattr(model, "tokenize", None)  # the model's own tokenizer (CLIP BPE for heads without one)
    ids = (tok(list(class_names), context_length) if tok else tokenize(list(class_names), context_length)).to(
        device
    )
    with eval_mode(model):
        feats = torch.cat([model.encode_text(ids[i : i + 256]) for i in range(0, len(ids), 256)])  # (K, D)
    return F.normalize(feats.float(), dim=-1)


class LinearHead(nn.Module):
    """A linear classifier on the L2-normalized video embedding, ``(B, D) -> (B, K)``.

    `from_class_features` sets its weight to ``scale * class_features`` and its bias to zero, so before training
    it computes exactly the text classifier (`stanvid.training.losses.text_classifier_logits`) and fine-tuning starts
    from the zero-shot solution (unverified: the paper does not describe a head).
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    @classmethod
    def from_class_features(cls, class_features: torch.Tensor, scale: float) -> LinearHead:
        head = cls(class_features.shape[1], class_features.shape[0])
        with torch.no_grad():
            head.fc.weight.copy_(F.normalize(class_features.float(), dim=-1) * scale)
            head.fc.bias.zero_()
        return head

    def forward(self, video_features: torch.Tensor) -> torch.Tensor:
        return self.fc(F.normalize(video_features.float(), dim=-1))  # (B, K)

"""Temporal modeling *after* CLIP, the baselines the paper compares STAN with (paper Table 1, "posterior").

- `meanP`: no module; the frame embeddings are pooled as they are (see `ModelConfig.pooling`).
- `seqTransf`: CLIP4Clip's temporal transformer (Luo et al., 2021): frame embeddings plus a learned frame
  position embedding go through a few CLIP-style blocks, and the input is added back (residual).
"""

from __future__ import annotations

import torch
from torch import nn

from stanvid.models.clip import Block, TextTransformer, run_block
from stanvid.models.config import SeqTransfConfig


class SeqTransformer(nn.Module):
    """CLIP4Clip `seqTransf` over (B, T, D) frame embeddings.

    As in CLIP4Clip: layer norms with eps 1e-12 (its TF-style LayerNorm), heads = width // 64, QuickGELU MLP of
    4x width, and a frame position table of `max_frames` rows (77) that is sliced to T at use and kept whole.
    """

    def __init__(self, cfg: SeqTransfConfig, width: int) -> None:
        super().__init__()
        heads = cfg.heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"seqTransf width {width} is not divisible by its heads {heads}")
        self.frame_pos = nn.Parameter(torch.empty(cfg.max_frames, width))
        self.blocks = nn.ModuleList(
            [Block(width, heads, 4 * width, "quick_gelu", cfg.ln_eps) for _ in range(cfg.layers)]
        )
        self.grad_checkpointing = False
        nn.init.normal_(self.frame_pos, std=0.01)

    def init_from_text(self, text: TextTransformer) -> bool:
        """CLIP4Clip's initialisation: frame positions and blocks copied from CLIP's text tower.

        Only possible when the text width equals the embedding width (true for B/32 and B/16); returns whether
        it was done, otherwise the random initialisation stays.
        """
        if text.cfg.width != self.frame_pos.shape[1] or len(text.blocks) < len(self.blocks):
            return False
        rows = min(self.frame_pos.shape[0], text.pos_embed.shape[0])
        with torch.no_grad():
            self.frame_pos[:rows].copy_(text.pos_embed[:rows])
        for mine, theirs in zip(self.blocks, text.blocks, strict=False):
            mine.load_state_dict(theirs.state_dict())
        return True

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        t = frames.shape[1]
        if t > self.frame_pos.shape[0]:
            raise ValueError(f"seqTransf supports at most {self.frame_pos.shape[0]} frames, got {t}")
        x = frames + self.frame_pos[:t]
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing)
        return x + frames

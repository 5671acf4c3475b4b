"""Perception Encoder, PE-Core (Bolya et al., 2025): the image tower as timm ports it (`vit_pe_core_*`, an `Eva`).

Patch embedding without a bias, a class token and a learned absolute position embedding, a LayerNorm before the
blocks, pre-norm blocks whose attention applies a 2-D rotary position embedding to every token but the class
token, a final LayerNorm, attention pooling over all tokens (MAP, `stanvid.models.siglip.AttentionPool`) and a
linear projection with a bias. The text tower is CLIP's (`stanvid.models.clip.TextTransformer`: causal, pooled at
end-of-text, CLIP BPE, context 32 in the releases).

The rotary table is computed as timm's `RotaryEmbeddingCat` does (`in_pixels=False`): per head of width d, d/4
frequencies `1 / temperature ** (i / (d/4))`; patch coordinates `arange(n) + grid_offset` on each axis, scaled
by `ref_grid / grid` (the grid the model was trained at), stacked in `xy` order (x the column, then y the row)
for each patch of the row-major grid; sin and cos of coordinate x frequency, each repeated twice (interleaved
pairs), concatenated as (sin, cos).
"""

from __future__ import annotations

import torch
from torch import nn

from stanvid.models.clip import Block, run_block
from stanvid.models.config import VisionConfig
from stanvid.models.siglip import AttentionPool, check_image_size

ROPE_TEMPERATURE = 10000.0


def rope_table(
    grid: int, head_dim: int, ref_grid: int | None = None, grid_offset: float = 0.0, device=None
) -> torch.Tensor:
    """(grid*grid, 2 * head_dim): sin then cos of each patch's rotary angles (see the module docstring)."""
    bands = head_dim // 4
    freqs = 1.0 / ROPE_TEMPERATURE ** (
        torch.arange(bands, dtype=torch.int64, device=device).to(torch.float32) / bands
    )  # (d/4,)
    coords = torch.arange(grid, dtype=torch.int64, device=device).to(torch.float32) + grid_offset  # (g,)
    if ref_grid is not None:
        coords = coords / grid * ref_grid
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each: row, column of each patch
    angles = torch.stack([xs, ys], dim=-1).unsqueeze(-1) * freqs  # (g, g, 2, d/4): x first (`xy` indexing)
    angles = angles.reshape(grid * grid, -1)  # (P, d/2)
    sin = angles.sin().repeat_interleave(2, dim=-1)  # (P, d)
    cos = angles.cos().repeat_interleave(2, dim=-1)
    return torch.cat([sin, cos], dim=-1)


class PECoreVisionTransformer(nn.Module):
    """PE-Core's image tower, with the interface of `stanvid.models.clip.VisionTransformer`."""

    attention_pooled = True

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.num_prefix = 1 if cfg.class_token else 0
        self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.empty(width))
            nn.init.normal_(self.class_embedding, std=0.02)
        self.pos_embed = nn.Parameter(torch.empty(self.num_prefix + cfg.num_patches, width))
        self.ln_pre = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(
            [Block(width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps) for _ in range(cfg.layers)]
        )
        self.ln_post = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.pool = AttentionPool(width, cfg.pool_heads, cfg.pool_mlp_dim, cfg.act, cfg.ln_eps)
        self.proj = nn.Linear(width, embed_dim)
        self.grad_checkpointing = False
        self._rope: dict[torch.device, torch.Tensor] = {}
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    @property
    def rope(self) -> torch.Tensor:
        """The rotary table (P, 2 * head_dim) on the weights' device, computed once per device (not a buffer:
        a model built on the meta device and given its weights still has it)."""
        device = self.pos_embed.device
        if device not in self._rope:
            cfg = self.cfg
            self._rope[device] = rope_table(
                cfg.grid, cfg.width // cfg.heads, cfg.rope_ref_grid, cfg.rope_grid_offset, device=device
            )
        return self._rope[device]

    @property
    def patch_pos_embed(self) -> torch.Tensor:
        return self.pos_embed[self.num_prefix :]  # (P, C)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, prefix + P, C): class token first, position embedding, `ln_pre`."""
        check_image_size(images, self.cfg)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, P, C)
        if self.num_prefix:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return self.ln_pre(x + self.pos_embed.to(x.dtype))

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.blocks[i], x, self.grad_checkpointing, False, self.rope, self.num_prefix)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, C) -> (N, C): final LayerNorm, then attention pooling over every token (class token too)."""
        return self.pool(self.ln_post(x))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for i in range(len(self.blocks)):
            x = self.block(i, x)
        return self.head(self.pool_tokens(x))

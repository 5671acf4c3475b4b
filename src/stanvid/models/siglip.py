"""SigLIP and SigLIP 2 (Zhai et al., 2023; Tschannen et al., 2025): the image tower and its attention pooling.

The image tower has no class token: patch embedding (with a bias) plus a learned position embedding, pre-norm
blocks (tanh-approximated GELU in the released configs, LayerNorm eps 1e-6), a final LayerNorm, then a
multi-head attention pooling head (MAP): one learned probe attends over every token, the result goes through
an output projection, then LayerNorm + MLP as a residual. The pooled vector is the image embedding: there is no
projection after it, so the embedding width is the tower's width.

The text tower is `stanvid.models.clip.TextTransformer` with `causal=False` (no mask: every token, padding
included, sees every other), pooled at the last position and projected with a bias. SigLIP's sigmoid loss adds
a learnable `logit_bias` to `exp(logit_scale) * cosine` (`VideoCLIP.logit_bias`).

Checkpoint key maps live in `stanvid.checkpoints.siglip` (Hugging Face `SiglipModel`) and
`stanvid.checkpoints.timm_towers` (open_clip's timm towers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stanvid.models.clip import MLP, Block, run_block
from stanvid.models.config import VisionConfig


class AttentionPool(nn.Module):
    """MAP head: a learned probe attends over (N, L, C) tokens -> (N, C), then `x + mlp(ln(x))`.

    Parameter layout is timm's `AttentionPoolLatent` (`latent` -> `probe`, separate `q` and fused `kv`
    projections); Hugging Face's `nn.MultiheadAttention` in-projection splits into the same two.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, ln_eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.empty(1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)
        self.fused = True
        nn.init.normal_(self.probe, std=width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, seq, width = x.shape
        d = width // self.heads
        q = self.q(self.probe.to(x.dtype)).view(1, self.heads, 1, d).expand(n, -1, -1, -1)  # (N, h, 1, d)
        k, v = self.kv(x).view(n, seq, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (N, h, L, d)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        out = self.proj(out.reshape(n, width))  # (N, C)
        return out + self.mlp(self.ln(out))


class SiglipVisionTransformer(nn.Module):
    """SigLIP's image tower. Same interface as `stanvid.models.clip.VisionTransformer` (`embed`, `block`,
    `pool_tokens`, `head`), which is what the video model and the STAN branch use."""

    num_prefix = 0  # no class token
    rope = None
    attention_pooled = True

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches, width))
        self.blocks = nn.ModuleList(
            [Block(width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps) for _ in range(cfg.layers)]
        )
        self.ln_post = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.pool = AttentionPool(width, cfg.pool_heads, cfg.pool_mlp_dim, cfg.act, cfg.ln_eps)
        self.grad_checkpointing = False
        nn.init.normal_(self.pos_embed, std=width**-0.5)

    @property
    def patch_pos_embed(self) -> torch.Tensor:
        return self.pos_embed  # (P, C)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, C): patch tokens plus the position embedding."""
        check_image_size(images, self.cfg)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, P, C)
        return x + self.pos_embed.to(x.dtype)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.blocks[i], x, self.grad_checkpointing)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's tokens (N, L, C) -> pooled (N, C): final LayerNorm, then the MAP head."""
        return self.pool(self.ln_post(x))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled  # SigLIP's image embedding is the pooled vector itself

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for i in range(len(self.blocks)):
            x = self.block(i, x)
        return self.head(self.pool_tokens(x))


def check_image_size(images: torch.Tensor, cfg: VisionConfig) -> None:
    if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
        raise ValueError(
            f"images must be {cfg.image_size}x{cfg.image_size} for this model, got {tuple(images.shape[-2:])}"
        )

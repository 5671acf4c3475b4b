"""CLIP's image (ViT) and text towers as plain modules.

Layout follows OpenAI's CLIP (pre-norm residual blocks, class token, `ln_pre`/`ln_post`, projection without
bias); parameter names are our own and `stanvid.checkpoints.convert` maps OpenAI, Hugging Face and official-STAN keys onto
them. Attention goes through `F.scaled_dot_product_attention` with a fused q/k/v projection; a plain-math path
(`Attention.fused = False`) computes the same thing step by step and a test pins the two together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stanvid.models.config import TextConfig, VisionConfig

QUICK_GELU_SCALE = 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def make_activation(name: str) -> nn.Module:
    """`quick_gelu` (OpenAI), `gelu` (exact, open_clip's and timm's default) or `gelu_tanh` (the tanh
    approximation: SigLIP's `gelu_pytorch_tanh`, timm's `gelu_tanh`)."""
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved rotation of 2-D rotary embeddings."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, prefix: int) -> torch.Tensor:
    """Rotary embedding on the tokens after the first `prefix` (class or summary tokens pass unchanged).

    x: (N, heads, L, d); rope: (L - prefix, 2d), sin then cos per position (timm's `RotaryEmbeddingCat` layout,
    built by `stanvid.models.pecore.rope_table`).
    """
    sin, cos = rope.to(x.dtype).chunk(2, dim=-1)  # (P, d) each
    tokens = x[:, :, prefix:]
    rotated = tokens * cos + rotate_pairs(tokens) * sin
    return torch.cat([x[:, :, :prefix], rotated], dim=2) if prefix else rotated


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (as OpenAI's `in_proj_weight`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fused = True

    def forward(
        self, x: torch.Tensor, causal: bool = False, rope: torch.Tensor | None = None, prefix: int = 1
    ) -> torch.Tensor:
        """(N, L, C) -> (N, L, C); `rope` (PE-Core): rotary table for the tokens after the first `prefix`."""
        n, seq, width = x.shape
        # (N, L, 3C) -> (3, N, heads, L, C/heads)
        q, k, v = (
            self.qkv(x).view(n, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        )
        if rope is not None:
            q, k = apply_rope(q, rope, prefix), apply_rope(k, rope, prefix)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = _math_attention(q, k, v, causal)
        out = out.transpose(1, 2).reshape(n, seq, width)  # (N, L, C)
        return self.proj(out)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out; the reference the fused kernel is tested against."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (N, h, L, L)
    if causal:
        seq = q.shape[-2]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class MLP(nn.Module):
    """fc1 -> activation -> fc2.

    QuickGELU is computed as silu(c h) / c with c = 1.702, since x * sigmoid(c x) = silu(c x) / c: in inference
    that is three in-place passes over the hidden activations and no temporaries (the activation was the largest
    non-matmul cost on CPU). The weights are only ever used through the module calls, so `fc1`/`fc2` may be
    swapped for quantized or otherwise wrapped linear layers (`stanvid.precision` does for int8).
    """

    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (..., hidden)
        if not isinstance(self.act, QuickGELU):
            h = self.act(h)
        elif torch.is_grad_enabled():
            h = F.silu(h * QUICK_GELU_SCALE) * (1.0 / QUICK_GELU_SCALE)
        else:  # h is our own temporary: overwrite it
            h = F.silu(h.mul_(QUICK_GELU_SCALE), inplace=True).mul_(1.0 / QUICK_GELU_SCALE)
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, ln_eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(
        self, x: torch.Tensor, causal: bool = False, rope: torch.Tensor | None = None, prefix: int = 1
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, rope, prefix)
        return x + self.mlp(self.ln_2(x))


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool, *args) -> torch.Tensor:
    """Run a block, through activation checkpointing when asked (recomputes it in backward: same values)."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


class VisionTransformer(nn.Module):
    """CLIP's ViT. `embed` and `blocks` are exposed separately because STAN reads intermediate layers.

    Every image tower (`stanvid.models.siglip`, `stanvid.models.pecore`) has this interface: `embed`, `block`,
    `pool_tokens` (last tokens -> the vector the head takes: here the class token), `head`, `num_prefix`
    (tokens before the patches), `patch_pos_embed`, `rope` and `attention_pooled`.
    """

    num_prefix = 1
    rope = None
    attention_pooled = False

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(
            [Block(width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps) for _ in range(cfg.layers)]
        )
        self.ln_post = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpointing = False
        scale = width**-0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        nn.init.normal_(self.proj.weight, std=scale)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1 + P, C): patch tokens, class token first, position embedding, `ln_pre`."""
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            raise ValueError(
                f"images must be {self.cfg.image_size}x{self.cfg.image_size} for this model, "
                f"got {tuple(images.shape[-2:])}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, P, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # (N, 1 + P, C)
        return self.ln_pre(x)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.blocks[i], x, self.grad_checkpointing)

    @property
    def patch_pos_embed(self) -> torch.Tensor:
        return self.pos_embed[1:]  # (P, C)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]  # the class token

    def head(self, cls_token: torch.Tensor) -> torch.Tensor:
        """(N, C) class token -> (N, D) embedding: `ln_post` then projection."""
        return self.proj(self.ln_post(cls_token))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for i in range(len(self.blocks)):
            x = self.block(i, x)
        return self.head(self.pool_tokens(x))


class TextTransformer(nn.Module):
    """CLIP's causal text transformer, pooled at the end-of-text token (the largest id, as CLIP pools).

    SigLIP's text tower is the same stack with `causal=False` (every token sees every other, padding
    included), pooled at the last position (`pool="last"`) and a projection with a bias.
    """

    def __init__(
        self,
        cfg: TextConfig,
        embed_dim: int,
        causal: bool = True,
        pool: str = "argmax",
        proj_bias: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.pool_at = pool
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            [Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps) for _ in range(cfg.layers)]
        )
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=proj_bias)
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)

    def forward(self, ids: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """(N, L) token ids -> (N, D); with `pool=False` every position projected, (N, L, D).

        The per-token form is Mug-STAN's (`CLIPTextPretrained(all_proj=True)` in the official code): the last
        hidden state after `ln_final`, every position through the projection, padding included (the causal mask
        is the only mask, so the end-of-text row equals the pooled embedding).
        """
        if ids.dim() != 2:
            raise ValueError(f"token ids must be (N, L), got shape {tuple(ids.shape)}")
        seq = ids.shape[1]
        if seq > self.cfg.context_length:
            raise ValueError(f"token ids have length {seq} > context_length {self.cfg.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:seq]  # (N, L, W)
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing, self.causal)
        x = self.ln_final(x)
        if not pool:
            return self.proj(x)  # (N, L, D)
        if self.pool_at == "last":
            return self.proj(x[:, -1])
        eot = ids.argmax(dim=-1)  # (N,)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])

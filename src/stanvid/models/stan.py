"""The STAN branch: Spatial-Temporal Auxiliary Network (Liu et al., CVPR 2023, Sec. 3).

A side branch of K layers that reads the outputs of the last K CLIP layers. Branch layer k takes CLIP layer
`L-K+k`'s tokens (folded to one class token and T*P patch tokens), adds them to its own previous output, and runs
a temporal module then a spatial module. Its class token is added to every frame's final CLIP class token.
CLIP's own forward pass is untouched.

Token layout inside the branch is the official one: (B, 1 + P*T, C), the class token first, then patches
ordered patch-major, time-minor (`(p t)`), so a temporal module sees each patch's T tokens as one contiguous run.

Names map onto the official checkpoint (`mmaction/models/backbones/clip_stan_hf.py`) in `stanvid.checkpoints.convert`:
`STAN_T_layers` -> `temporal`, `STAN_S_layers` -> `spatial`, `STAN_time_embed` -> `time_embed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from stanvid.models.clip import MLP, Attention, Block, run_block
from stanvid.models.config import STANConfig, VisionConfig

_WORD = (1 << 31) - 1  # the keyed masks hash 31-bit words: a product with a 32-bit odd constant fits an int64
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B, 0x2C1B3C6D)  # odd, so each round is a bijection of the 31-bit words


def _mix(x):
    """A bijective integer hash of 31-bit words (xorshift-multiply rounds, as in murmur's finalizer); the same
    arithmetic on a Python int and elementwise on an int64 tensor, on any device."""
    for c in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * c) & _WORD
    return x ^ (x >> 15)


@dataclass(frozen=True)
class SampleKeys:
    """What stochastic depth keys its masks on in training, instead of drawing them from torch's generator.

    A drop-path row's keep/drop decision is a hash of (``seed``, ``step``, the layer's drop-path, the sample's
    ``index``, the row within the sample): the same sample gets the same masks at the same step whichever
    micro-batch, rank or batch size it arrives in. The trainer sets them (`sample_keys`) for every training
    forward pass: ``seed`` the run's, ``step`` the optimizer step, ``index`` ``(B,)`` each sample's position in
    the step's global batch.
    """

    seed: int
    step: int
    index: torch.Tensor  # (B,) int64

    def keep_mask(self, stream: int, rows: int, keep: float, device: torch.device) -> torch.Tensor:
        """``(rows,)`` bool, True where a row is kept, for the ``stream``-th drop-path of the model; the rows are
        sample-major (``rows = B * m``, m rows per sample), as every drop-path of the branch sees them."""
        index = self.index.to(device=device, dtype=torch.long)
        b = index.numel()
        if b == 0 or rows % b:
            raise ValueError(f"drop-path got {rows} rows for a batch of {b} keyed samples")
        m = rows // b
        base = 0x1B873593
        for word in (self.seed, self.step, stream):
            word = int(word)
            while True:  # every 31-bit piece of the word
                base = _mix(base ^ (word & _WORD))
                word >>= 31
                if not word:
                    break
        h = _mix(base ^ (index & _WORD))  # (B,)
        h = _mix(h.repeat_interleave(m) ^ torch.arange(m, device=device).repeat(b))  # (B*m,)
        return h < int(keep * (1 << 31))


_SAMPLE_KEYS: ContextVar[SampleKeys | None] = ContextVar("stanvid_sample_keys", default=None)


@contextlib.contextmanager
def sample_keys(keys: SampleKeys | None) -> Iterator[None]:
    """Training forward passes inside key the branch's drop-path masks on ``keys`` (None: torch's generator).

    The branch reads the keys when a layer starts and hands them to the layer as an argument, so activation
    checkpointing recomputes the same masks in backward, whichever thread runs it."""
    token = _SAMPLE_KEYS.set(keys)
    try:
        yield
    finally:
        _SAMPLE_KEYS.reset(token)


class DropPath(nn.Module):
    """Stochastic depth per sample (dim 0), rescaled by 1/keep; identity in eval mode or at rate 0.

    The official code applies it to the reshaped tensors, so a "sample" is a (video, patch) row in the temporal
    module and a (video, frame) row in the spatial one; we keep that. With `SampleKeys` the masks are a
    function of the keys (and ``stream``, this drop-path's number in the branch), else drawn from torch's
    generator.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)
        self.stream = 0  # set by STANBranch: which drop-path of the branch this is

    def forward(self, x: torch.Tensor, keys: SampleKeys | None = None) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if keys is None:
            mask = x.new_empty(shape).bernoulli_(keep)
        else:
            mask = keys.keep_mask(self.stream, x.shape[0], keep, x.device).to(x.dtype).view(shape)
        return x * mask / keep


class AttnTemporal(nn.Module):
    """Temporal self-attention (official `CLIPLayer_AttnTime`): each patch position attends over its T frames.

    LayerNorm -> attention -> drop-path -> `fc` (zero-initialised, so the branch starts as a pure spatial
    model) -> residual on the patch tokens. The class token passes through.
    """

    def __init__(self, width: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)  # the official module uses torch's default eps, not the CLIP config's
        self.attn = Attention(width, heads)
        self.drop_path = DropPath(drop_path)
        self.fc = nn.Linear(width, width)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, frames: int, keys: SampleKeys | None = None) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        b, pt, c = patches.shape
        h = patches.reshape(b * (pt // frames), frames, c)  # (B*P, T, C)
        h = self.fc(self.drop_path(self.attn(self.ln(h)), keys))
        return torch.cat([cls, patches + h.view(b, pt, c)], dim=1)


class ConvTemporal(nn.Module):
    """The paper's 3D-convolution temporal module, which the official code names but never defines.

    Choices made where the paper is silent, to keep it a drop-in twin of `AttnTemporal`:
    - patch tokens are laid out as a (B, C, T, H', W') volume and the class token passes through unchanged;
    - LayerNorm before the convolution (pre-norm, like every other sub-layer of the branch);
    - a 3D convolution with a temporal kernel of 3 x 1 x 1 by default ("same" padding, so T is kept), full
      channel mixing by default or depthwise (`STANConfig.depthwise`), both configurable;
    - drop-path, then a linear `fc` initialised to zero and a residual, as in the attention module, so a freshly
      built branch is the same function whichever temporal module it has.
    """

    def __init__(
        self, width: int, grid: int, kernel_size: tuple[int, int, int], depthwise: bool, drop_path: float
    ):
        super().__init__()
        self.grid = grid
        self.ln = nn.LayerNorm(width)
        self.conv = nn.Conv3d(
            width,
            width,
            kernel_size,
            padding=tuple(k // 2 for k in kernel_size),
            groups=width if depthwise else 1,
        )
        self.drop_path = DropPath(drop_path)
        self.fc = nn.Linear(width, width)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, frames: int, keys: SampleKeys | None = None) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        b, pt, c = patches.shape
        g = self.grid
        h = self.ln(patches).view(b, g, g, frames, c).permute(0, 4, 3, 1, 2)  # (B, C, T, H', W')
        h = self.conv(h).permute(0, 3, 4, 2, 1).reshape(b, pt, c)  # back to (B, P*T, C), (p t) order
        h = self.fc(self.drop_path(h, keys))
        return torch.cat([cls, patches + h], dim=1)


class SpatialLayer(nn.Module):
    """Spatial module (official `CLIPLayer_Spatial`), initialised from the matching CLIP layer.

    The branch class token is copied to every frame, each frame attends over its own 1 + P tokens, the T class
    outputs are averaged back into one, residual; then LayerNorm -> CLIP MLP -> residual on all tokens.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, drop_path: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, frames: int, keys: SampleKeys | None = None) -> torch.Tensor:
        b, n, c = x.shape
        p = (n - 1) // frames
        cls = x[:, :1].unsqueeze(1).expand(b, frames, 1, c)  # (B, T, 1, C)
        patches = x[:, 1:].view(b, p, frames, c).transpose(1, 2)  # (B, T, P, C)
        h = torch.cat([cls, patches], dim=2).reshape(b * frames, 1 + p, c)  # (B*T, 1+P, C)
        h = self.drop_path(self.attn(self.ln_1(h)), keys).view(b, frames, 1 + p, c)
        h_cls = h[:, :, :1].mean(dim=1)  # (B, 1, C)
        h_patches = h[:, :, 1:].transpose(1, 2).reshape(b, p * frames, c)  # (B, P*T, C)
        x = x + torch.cat([h_cls, h_patches], dim=1)
        return x + self.mlp(self.ln_2(x))

    def load_from_clip_block(self, block: Block) -> None:
        """Copy a CLIP block's attention, MLP and norms (the paper's initialisation of the spatial module)."""
        for mine, theirs in (
            (self.ln_1, block.ln_1),
            (self.attn, block.attn),
            (self.ln_2, block.ln_2),
            (self.mlp, block.mlp),
        ):
            mine.load_state_dict(theirs.state_dict())


class _BranchLayer(nn.Module):
    """A temporal module then a spatial module, the unit that gradient checkpointing recomputes."""

    def __init__(self, temporal: nn.Module, spatial: SpatialLayer) -> None:
        super().__init__()
        self.temporal = temporal
        self.spatial = spatial

    def forward(self, x: torch.Tensor, frames: int, keys: SampleKeys | None = None) -> torch.Tensor:
        return self.spatial(self.temporal(x, frames, keys), frames, keys)


class STANBranch(nn.Module):
    """K branch layers plus the time embedding. CLIP's class and position embeddings are passed in at call time
    (the official branch re-uses CLIP's own tables, so they are shared, not copied)."""

    def __init__(self, cfg: STANConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = vision.width
        # [0.0] when depth is 1, as np.linspace; on the CPU, so a model built on the meta device has them too
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        if cfg.time_module == "selfattn":
            temporal = [AttnTemporal(width, vision.heads, r) for r in rates]
        else:
            temporal = [ConvTemporal(width, vision.grid, cfg.kernel_size, cfg.depthwise, r) for r in rates]
        spatial = [SpatialLayer(width, vision.heads, vision.mlp_dim, vision.act, r) for r in rates]
        self.layers = nn.ModuleList([_BranchLayer(t, s) for t, s in zip(temporal, spatial, strict=True)])
        for stream, module in enumerate(m for m in self.modules() if isinstance(m, DropPath)):
            module.stream = stream
        # nn.Embedding's default N(0, 1) init, as the official `STAN_time_embed` is left
        self.time_embed = nn.Parameter(torch.randn(cfg.max_frames, width))
        self.grad_checkpointing = False

    @property
    def depth(self) -> int:
        return len(self.layers)

    def init_from_clip(self, clip_blocks: nn.ModuleList) -> None:
        """Spatial module k <- CLIP layer L-K+k (paper Sec. 3.2; official `init_weights`)."""
        start = len(clip_blocks) - self.depth
        for k, layer in enumerate(self.layers):
            layer.spatial.load_from_clip_block(clip_blocks[start + k])

    def embed_input(
        self, h: torch.Tensor, class_embedding: torch.Tensor, pos_embed: torch.Tensor
    ) -> torch.Tensor:
        """First branch input (official `input_ini`) from CLIP layer L-K's tokens h: (B, T, 1+P, C).

        Patches get CLIP's spatial position embeddings again plus a learned time embedding; the class token is the
        average of the frames' mean class token and CLIP's (class embedding + position 0).
        """
        b, t, n, c = h.shape
        if t > self.time_embed.shape[0]:
            raise ValueError(f"STAN supports at most {self.time_embed.shape[0]} frames, got {t}")
        cls_old = h[:, :, 0].mean(dim=1, keepdim=True)  # (B, 1, C)
        patches = h[:, :, 1:] + pos_embed[1:] + self.time_embed[:t, None, :]  # (B, T, P, C)
        cls = (cls_old + (class_embedding + pos_embed[0])) / 2
        return torch.cat([cls, patches.transpose(1, 2).reshape(b, (n - 1) * t, c)], dim=1)  # (B, 1+P*T, C)

    def fold(self, h: torch.Tensor) -> torch.Tensor:
        """A later CLIP layer's tokens (B, T, 1+P, C) in branch layout: mean class token, then patches `(p t)`.

        With `cls_residue` the class token averages every second frame in training (official option).
        """
        b, t, n, c = h.shape
        cls_frames = h[:, ::2, 0] if (self.cfg.cls_residue and self.training) else h[:, :, 0]
        cls = cls_frames.mean(dim=1, keepdim=True)  # (B, 1, C)
        return torch.cat([cls, h[:, :, 1:].transpose(1, 2).reshape(b, (n - 1) * t, c)], dim=1)

    def layer(self, k: int, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Branch layer ``k``; in training, with the `sample_keys` in force passed in as an argument, so that
        a checkpointed layer recomputes the same drop-path masks."""
        keys = _SAMPLE_KEYS.get() if self.training else None
        return run_block(self.layers[k], x, self.grad_checkpointing, frames, keys)

"""The video-text model: CLIP towers plus one temporal module, with the encoding API.

`encode_video`, `encode_image` and `encode_text` are the public API; none of them normalizes, and
`logit_scale` (log scale) is there for similarity as in CLIP. `logit_bias` is SigLIP's learnable bias of the
sigmoid loss (a 0-dim parameter, loaded from the checkpoint) on SigLIP families, None on the others unless the
config has `CLIPConfig.logit_bias_init` (or `add_logit_bias` made one for the sigmoid loss). `tokenize` gives the
ids the model's own text tower reads (CLIP BPE, SigLIP's SentencePiece, a `tokenizer.json`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stanvid.errors import ConfigError
from stanvid.models.clip import Attention, TextTransformer, VisionTransformer
from stanvid.models.config import CLIPConfig, ModelConfig
from stanvid.models.pecore import PECoreVisionTransformer
from stanvid.models.pretrained import save_pretrained
from stanvid.models.siglip import AttentionPool, SiglipVisionTransformer
from stanvid.models.stan import STANBranch
from stanvid.models.temporal import SeqTransformer
from stanvid.models.text_tokenizers import ModelTokenizer, TextTokenizer, clip_tokenizer


def build_towers(clip: CLIPConfig) -> tuple[nn.Module, TextTransformer]:
    """The image and text towers of `clip.family` (format -> family -> build: the family is the config's)."""
    if clip.family == "siglip":
        visual: nn.Module = SiglipVisionTransformer(clip.vision, clip.embed_dim)
        text = TextTransformer(clip.text, clip.embed_dim, causal=False, pool="last", proj_bias=True)
        return visual, text
    if clip.family == "pecore":
        visual = PECoreVisionTransformer(clip.vision, clip.embed_dim)
    else:
        visual = VisionTransformer(clip.vision, clip.embed_dim)
    return visual, TextTransformer(clip.text, clip.embed_dim)


class VideoCLIP(nn.Module):
    """CLIP + temporal module (`meanP`, `seqTransf` or STAN), built from a `ModelConfig`.

    A freshly built model is initialised as the paper does when STAN sits on a plain CLIP: the spatial modules
    are copies of the matching CLIP layers and the temporal output projections are zero
    (`init_temporal_from_clip`, called again by `load_model` after CLIP weights are loaded).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        clip = config.clip
        self.visual, self.text = build_towers(clip)
        self.logit_scale = nn.Parameter(torch.tensor(float(clip.logit_scale_init)))
        bias = clip.logit_bias_init
        self.register_parameter(
            "logit_bias", nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        )
        self.tokenizer: TextTokenizer | None = clip_tokenizer() if clip.tokenizer.kind == "clip" else None
        if config.temporal == "stan":
            self.temporal: nn.Module | None = STANBranch(
                config.stan, clip.vision, self.visual.attention_pooled
            )
        elif config.temporal == "seqTransf":
            self.temporal = SeqTransformer(config.seq, clip.embed_dim)
        else:
            self.temporal = None
        self.init_temporal_from_clip()
        self.set_grad_checkpointing(config.grad_checkpointing)

    # ------------------------------------------------------------------ set-up
    def init_temporal_from_clip(self) -> None:
        """Initialise the temporal module from the CLIP weights currently in the model."""
        if isinstance(self.temporal, STANBranch):
            self.temporal.init_from_clip(self.visual.blocks)
        elif isinstance(self.temporal, SeqTransformer):
            self.temporal.init_from_text(self.text)

    def add_logit_bias(self, value: float) -> nn.Parameter:
        """The model's `logit_bias`, created at ``value`` (and recorded in the config, so `save_pretrained`
        writes it and `load_model` reads it back) when it has none: the sigmoid loss on a CLIP model."""
        if self.logit_bias is None:
            self.config.clip.logit_bias_init = float(value)
            self.logit_bias = nn.Parameter(torch.tensor(float(value), device=self.logit_scale.device))
        return self.logit_bias

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward (less memory, same outputs and gradients).

        Only a bool is taken: `bool("false")` is True, so a string from a config file would switch it on.
        """
        if not isinstance(enabled, bool):
            raise ConfigError(f"grad_checkpointing must be True or False, got {enabled!r}")
        self.config.grad_checkpointing = enabled
        for module in (self.visual, self.text, self.temporal):
            if module is not None:
                module.grad_checkpointing = enabled

    def set_fused_attention(self, enabled: bool = True) -> None:
        """SDPA kernels (default) or the plain-math attention path, for testing one against the other."""
        for module in self.modules():
            if isinstance(module, (Attention, AttentionPool)):
                module.fused = bool(enabled)

    def is_new_parameter(self, name: str) -> bool:
        """Parameters that are not CLIP's (the temporal module): the recipes give them a 10x learning rate."""
        return name.startswith("temporal.")

    # ------------------------------------------------------------------ text
    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        """The tokenizer `tokenize` uses (`load_model` sets the checkpoint's; `save_pretrained` writes its files)."""
        self.tokenizer = tokenizer

    def tokenize(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids for this model's text tower: a LongTensor (N, context_length), N = 1 for one string.

        `context_length` defaults to the text tower's. A tower pooled at the last position (SigLIP) always gets
        its own context length: where it pools depends on it.
        """
        return self.text_tokenizer()(texts, context_length)

    def text_tokenizer(self) -> ModelTokenizer:
        """`tokenize` as a standalone callable `(texts, context_length=None) -> LongTensor`, picklable, for
        datasets (`stanvid.data.RetrievalDataset(tokenizer=...)`) and worker processes."""
        if self.tokenizer is None:
            raise ConfigError(
                f"this {self.config.clip.family} model has no tokenizer: build it with load_model from a folder that "
                f"holds its {self.config.clip.tokenizer.file or 'tokenizer'} file, or call set_tokenizer"
            )
        context = self.config.clip.text.context_length
        return ModelTokenizer(self.tokenizer, context, context if self.text.pool_at == "last" else None)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, D): plain CLIP, no temporal module."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """(N, L) CLIP token ids -> (N, D), pooled at the end-of-text token, or per-token (N, L, D) with
        `pool=False` (Mug-STAN's text features: every position projected; `stanvid.mug_similarity` uses them)."""
        return self.text(ids, pool=pool)

    def encode_video(self, video: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """(B, T, 3, H, W) normalized frames -> (B, D), or per-frame (B, T, D) with `pool=False`.

        Per-frame embeddings are what the temporal module outputs (for STAN: each frame's CLIP class token plus the
        branch class token, `ln_post`, projection); pooling follows `config.pooling`.
        """
        if video.dim() != 5:
            raise ValueError(f"video must be (B, T, 3, H, W), got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        frames = video.reshape(b * t, *video.shape[2:])  # (B*T, 3, H, W)
        if isinstance(self.temporal, STANBranch):
            per_frame = self._stan_frames(frames, b, t)
        else:
            per_frame = self.visual(frames).view(b, t, -1)  # (B, T, D)
            if self.temporal is not None:
                per_frame = self.temporal(per_frame)
        return self.pool(per_frame) if pool else per_frame

    def pool(self, per_frame: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D) by the model's pooling rule (see `ModelConfig.pooling`)."""
        return pool_frames(per_frame, self.config.pooling)

    def _stan_frames(self, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """CLIP over all frames, the branch fed by the last K layers as they are computed (paper Fig. 2)."""
        visual, branch = self.visual, self.temporal
        x = visual.embed(frames)  # (B*T, prefix+P, C)
        n, c = x.shape[1:]
        layers = len(visual.blocks)
        start = layers - branch.depth
        pooled_tower, prefix = branch.attention_pooled, visual.num_prefix
        state = None
        for i in range(layers):
            x = visual.block(i, x)
            if i < start:
                continue
            h = x.view(b, t, n, c)
            if state is None and pooled_tower:
                inp = branch.embed_input_mean(h, visual.patch_pos_embed, prefix)
            elif state is None:
                inp = branch.embed_input(h, visual.class_embedding, visual.pos_embed)
            else:
                inp = state + (branch.fold_mean(h, prefix) if pooled_tower else branch.fold(h))
            state = branch.layer(i - start, inp, t, visual.rope)  # (B, 1+P*T, C)
        pooled = visual.pool_tokens(x).view(b, t, c)  # (B, T, C): each frame's class token or pooled vector
        summary = branch.summary_proj(state[:, :1]) if pooled_tower else state[:, :1]  # (B, 1, C)
        return visual.head((pooled + summary).reshape(b * t, c)).view(b, t, -1)  # (B, T, D)

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cosine similarity (+ logit_bias on SigLIP families), (N, D) x (M, D) -> (N, M)."""
        logits = self.logit_scale.exp() * F.normalize(text_emb, dim=-1) @ F.normalize(video_emb, dim=-1).t()
        return logits if self.logit_bias is None else logits + self.logit_bias

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory) -> None:
        """Write `config.json` + `model.safetensors` (atomically) so `stanvid.load_model(directory)` restores it."""
        save_pretrained(self, directory)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def pool_frames(per_frame: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, D) -> (B, D): the mean over frames, of unit vectors under "normalized_mean" (CLIP4Clip's rule),
    of the frames as they are otherwise (the official STAN code's). Every encoder pools with it."""
    if pooling == "normalized_mean":
        per_frame = F.normalize(per_frame, dim=-1)
    return per_frame.mean(dim=1)

"""open_clip's pretrained names (`ViT-B-32/laion2b_s34b_b79k`) -> the Hugging Face repository that holds them.

The facts (repository, activation, normalization, resize mode) are those of open_clip's `pretrained.py`, written
out here for the ViT CLIP models whose text tower is CLIP's own (CLIP BPE tokenizer, OpenAI layout): OpenAI's,
LAION's, DataComp's, MetaCLIP's and Apple's DFN releases. Each repository holds `open_clip_config.json` and the
weights as `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, which `load_model` reads.

Why the table records `quick_gelu` although the repository's config may too: open_clip decides the activation
from the model name (`ViT-B-32` vs `ViT-B-32-quickgelu`), so a user asking for `ViT-B-32/metaclip_400m` gets
exact GELU from open_clip, with a warning, on weights trained with QuickGELU. stanvid uses what the weights were
trained with, whichever of the two names is given.

SigLIP, SigLIP 2 (fixed resolution) and PE-Core releases are here too: their folders hold a timm image tower
(`stanvid.checkpoints.timm_towers`) and, for SigLIP, a `tokenizer.json`; open_clip's preprocessing for them
(`_slpcfg`, `_pecfg`: squash resize, mean = std = 0.5) is recorded per entry.

Not here (refused by name): CLIPA, EVA, CoCa, MobileCLIP, ViTamin, SigLIP 2 NaFlex and the other multilingual
models: their towers, pooling or tokenizers are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

from stanvid.models.config import PreprocessConfig
from stanvid.video.transforms import CLIP_MEAN, CLIP_STD

INCEPTION = (0.5, 0.5, 0.5)  # open_clip's INCEPTION_MEAN / INCEPTION_STD


@dataclass(frozen=True)
class Pretrained:
    """One open_clip release: where its files are and what its weights were trained with."""

    repo: str  # Hugging Face repository (open_clip_config.json + open_clip weights)
    quick_gelu: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"


def _qg(repo: str) -> Pretrained:
    return Pretrained(repo, quick_gelu=True)


def _siglip(repo: str) -> Pretrained:  # open_clip's `_slpcfg`
    return Pretrained(repo, mean=INCEPTION, std=INCEPTION, resize_mode="squash")


def _pe(repo: str) -> Pretrained:  # open_clip's `_pecfg`
    return Pretrained(repo, mean=INCEPTION, std=INCEPTION, resize_mode="squash", interpolation="bilinear")


def preprocess_of(entry: Pretrained) -> PreprocessConfig:
    """A release's preprocessing as the model config records it."""
    return PreprocessConfig(
        mean=entry.mean, std=entry.std, resize_mode=entry.resize_mode, interpolation=entry.interpolation
    )


_SIGLIP_NAMES = (
    "ViT-B-16-SigLIP ViT-B-16-SigLIP-256 ViT-B-16-SigLIP-i18n-256 ViT-B-16-SigLIP-384 ViT-B-16-SigLIP-512 "
    "ViT-L-16-SigLIP-256 ViT-L-16-SigLIP-384 ViT-SO400M-14-SigLIP ViT-SO400M-16-SigLIP-i18n-256 "
    "ViT-SO400M-14-SigLIP-384 ViT-B-32-SigLIP2-256 ViT-B-16-SigLIP2 ViT-B-16-SigLIP2-256 ViT-B-16-SigLIP2-384 "
    "ViT-B-16-SigLIP2-512 ViT-L-16-SigLIP2-256 ViT-L-16-SigLIP2-384 ViT-L-16-SigLIP2-512 ViT-SO400M-14-SigLIP2 "
    "ViT-SO400M-14-SigLIP2-378 ViT-SO400M-16-SigLIP2-256 ViT-SO400M-16-SigLIP2-384 ViT-SO400M-16-SigLIP2-512 "
    "ViT-gopt-16-SigLIP2-256 ViT-gopt-16-SigLIP2-384"
).split()
_PE_NAMES = (
    "PE-Core-T-16-384",
    "PE-Core-S-16-384",
    "PE-Core-B-16",
    "PE-Core-L-14-336",
    "PE-Core-bigG-14-448",
)


PRETRAINED: dict[str, dict[str, Pretrained]] = {
    "ViT-B-32": {
        "openai": _qg("timm/vit_base_patch32_clip_224.openai"),
        "laion400m_e31": _qg("timm/vit_base_patch32_clip_224.laion400m_e31"),
        "laion400m_e32": _qg("timm/vit_base_patch32_clip_224.laion400m_e32"),
        "laion2b_e16": Pretrained("timm/vit_base_patch32_clip_224.laion2b_e16"),
        "laion2b_s34b_b79k": Pretrained("laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        "datacomp_xl_s13b_b90k": Pretrained("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
        "datacomp_m_s128m_b4k": Pretrained("laion/CLIP-ViT-B-32-DataComp.M-s128M-b4K"),
        "datacomp_s_s13m_b4k": Pretrained("laion/CLIP-ViT-B-32-DataComp.S-s13M-b4K"),
        "metaclip_400m": _qg("timm/vit_base_patch32_clip_224.metaclip_400m"),
        "metaclip_fullcc": _qg("timm/vit_base_patch32_clip_224.metaclip_2pt5b"),
    },
    "ViT-B-32-256": {
        "datacomp_s34b_b86k": Pretrained("laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K"),
    },
    "ViT-B-16": {
        "openai": _qg("timm/vit_base_patch16_clip_224.openai"),
        "laion400m_e31": Pretrained("timm/vit_base_patch16_clip_224.laion400m_e31"),
        "laion400m_e32": Pretrained("timm/vit_base_patch16_clip_224.laion400m_e32"),
        "laion2b_s34b_b88k": Pretrained("laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
        "datacomp_xl_s13b_b90k": Pretrained("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
        "datacomp_l_s1b_b8k": Pretrained("laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K"),
        "dfn2b": _qg("apple/DFN2B-CLIP-ViT-B-16"),
        "metaclip_400m": _qg("timm/vit_base_patch16_clip_224.metaclip_400m"),
        "metaclip_fullcc": _qg("timm/vit_base_patch16_clip_224.metaclip_2pt5b"),
    },
    "ViT-B-16-plus-240": {
        "laion400m_e31": Pretrained("timm/vit_base_patch16_plus_clip_240.laion400m_e31"),
    },
    "ViT-L-14": {
        "openai": _qg("timm/vit_large_patch14_clip_224.openai"),
        "laion400m_e31": Pretrained("timm/vit_large_patch14_clip_224.laion400m_e31"),
        "laion400m_e32": Pretrained("timm/vit_large_patch14_clip_224.laion400m_e32"),
        "laion2b_s32b_b82k": Pretrained(
            "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", mean=INCEPTION, std=INCEPTION
        ),
        "datacomp_xl_s13b_b90k": Pretrained("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
        "metaclip_400m": _qg("timm/vit_large_patch14_clip_224.metaclip_400m"),
        "metaclip_fullcc": _qg("timm/vit_large_patch14_clip_224.metaclip_2pt5b"),
        "dfn2b": _qg("apple/DFN2B-CLIP-ViT-L-14"),
        "dfn2b_s39b": Pretrained("apple/DFN2B-CLIP-ViT-L-14-39B"),
    },
    "ViT-L-14-336": {
        "openai": _qg("timm/vit_large_patch14_clip_336.openai"),
    },
    "ViT-H-14": {
        "laion2b_s32b_b79k": Pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
        "metaclip_fullcc": _qg("timm/vit_huge_patch14_clip_224.metaclip_2pt5b"),
        "metaclip_altogether": Pretrained("timm/vit_huge_patch14_clip_224.metaclip_altogether"),
        "dfn5b": Pretrained("apple/DFN5B-CLIP-ViT-H-14", quick_gelu=True, resize_mode="squash"),
    },
    "ViT-H-14-378": {
        "dfn5b": Pretrained("apple/DFN5B-CLIP-ViT-H-14-378", quick_gelu=True, resize_mode="squash"),
    },
    "ViT-g-14": {
        "laion2b_s12b_b42k": Pretrained("laion/CLIP-ViT-g-14-laion2B-s12B-b42K"),
        "laion2b_s34b_b88k": Pretrained("laion/CLIP-ViT-g-14-laion2B-s34B-b88K"),
    },
    "ViT-bigG-14": {
        "laion2b_s39b_b160k": Pretrained("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
        "metaclip_fullcc": _qg("timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b"),
    },
    **{name: {"webli": _siglip(f"timm/{name}")} for name in _SIGLIP_NAMES},
    # open_clip's ViT-SO400M-14-SigLIP-378 reads the 384 weights at 378 (a config stanvid refuses by name)
    **{name: {"meta": _pe(f"timm/{name}")} for name in _PE_NAMES},
}


def lookup(name: str) -> Pretrained | None:
    """`MODEL/TAG` or `MODEL:TAG` (open_clip's spelling; `-quickgelu` model names too) -> its entry, else None.

    Tags are matched as open_clip does (case-insensitive, `-` = `_`). A `-quickgelu` name only names the
    QuickGELU releases, as in open_clip.
    """
    for sep in ("/", ":"):
        model, found, tag = name.partition(sep)
        if found and model and tag and "/" not in tag:
            break
    else:
        return None
    tag = tag.lower().replace("-", "_")
    quick_only = model.endswith("-quickgelu")
    entry = PRETRAINED.get(model.removesuffix("-quickgelu"), {}).get(tag)
    if entry is None or (quick_only and not entry.quick_gelu):
        return None
    return entry


def known_names() -> list[str]:
    """Every `MODEL/TAG` this table resolves (the `-quickgelu` spellings left out)."""
    return [f"{model}/{tag}" for model, tags in PRETRAINED.items() for tag in tags]

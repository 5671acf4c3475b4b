"""Resize, crop, flip and normalize video clips held as tensors (plain torch, no torchvision).

Input clips are ``uint8`` tensors in ``(T, H, W, 3)`` (what ``stanvid.read_frames`` returns) or
``(T, 3, H, W)``; every function returns ``(T, 3, H, W)``. Geometric steps keep ``uint8`` (results are
rounded and clamped, as PIL and OpenCV do on 8-bit images), so a clip is converted to float once, at the
end, by ``normalize``. Randomness comes from an explicit numpy ``Generator`` (or seed), and one draw is
shared by all frames of a clip: a crop or flip that differed between frames would invent motion.

The composed transforms:

* ``EvalTransform``: CLIP's evaluation preprocessing (shortest side to ``size`` with bicubic, antialiased
  resampling, centre crop, CLIP mean/std), as OpenAI CLIP's ``_transform`` does with PIL.
* ``TrainTransform``: random resized crop shared by the clip's frames, optional horizontal flip (off for
  Something-Something, whose labels such as "left to right" change meaning when mirrored).
* ``stan_train_transform()``: the official STAN retrieval recipe (``Resize(-1, 256)``, mmaction2
  ``RandomResizedCrop``, ``Resize(224, 224)``, bilinear, no flip; configs/exp/stan/stan_msrvtt_b32_hf.py).
* ``MultiCropTransform``: three ``size x size`` views along the longer side for recognition testing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stanvid.errors import ConfigError
from stanvid.video.sampling import as_generator

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "to_tchw",
    "resize",
    "resize_short_side",
    "crop",
    "center_crop",
    "hflip",
    "normalize",
    "random_resized_crop_box",
    "short_side_size",
    "three_crop",
    "EvalTransform",
    "TrainTransform",
    "MultiCropTransform",
    "stan_train_transform",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def to_tchw(frames: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """View a clip as ``(T, 3, H, W)``; ``layout`` is ``"thwc"``, ``"tchw"`` or ``"auto"`` (by channel axis)."""
    if frames.dim() != 4:
        raise ValueError(
            f"expected a clip of 4 dims (T, H, W, 3) or (T, 3, H, W), got shape {tuple(frames.shape)}"
        )
    if layout == "auto":
        last, second = frames.shape[-1] == 3, frames.shape[1] == 3
        if last and second:
            raise ValueError(
                f"clip shape {tuple(frames.shape)} is ambiguous: pass layout='thwc' or layout='tchw'"
            )
        if not (last or second):
            raise ValueError(f"clip shape {tuple(frames.shape)} has no axis of 3 channels (at dim 1 or -1)")
        layout = "thwc" if last else "tchw"
    if layout == "thwc":
        if frames.shape[-1] != 3:
            raise ValueError(f"layout 'thwc' needs 3 channels last, got shape {tuple(frames.shape)}")
        return frames.permute(0, 3, 1, 2)  # (T, 3, H, W)
    if layout == "tchw":
        if frames.shape[1] != 3:
            raise ValueError(f"layout 'tchw' needs 3 channels at dim 1, got shape {tuple(frames.shape)}")
        return frames
    raise ConfigError(f"layout must be 'auto', 'thwc' or 'tchw', got {layout!r}")


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")


def resize(
    frames: torch.Tensor,
    size: tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize every frame to ``size = (height, width)``; ``uint8`` in gives rounded ``uint8`` out.

    For ``uint8`` frames the filter runs in two separable passes rounded to 8 bits in between, as PIL does:
    CLIP's bicubic preprocessing is then reproduced to within one grey level on a few pixels in ten thousand
    (a single 2-D pass differs by up to 4 levels on a fifth of them). The width goes first, except when the
    height shrinks while the width grows, where PIL (13) does the height first.
    """
    _check_interpolation(interpolation)
    frames = to_tchw(frames)
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ConfigError(f"resize size must be positive, got {size}")
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    kwargs = {} if interpolation == "nearest" else {"align_corners": False, "antialias": antialias}
    if frames.dtype != torch.uint8:
        out = F.interpolate(frames.float(), size=(height, width), mode=interpolation, **kwargs)
        return out.to(frames.dtype)  # (T, 3, height, width)
    x = frames.float()
    if interpolation != "nearest":
        in_h, in_w = x.shape[-2:]
        first = (height, in_w) if height < in_h and width > in_w else (in_h, width)
        if first not in ((in_h, in_w), (height, width)):
            x = F.interpolate(x, size=first, mode=interpolation, **kwargs).round_().clamp_(0, 255)
    x = F.interpolate(x, size=(height, width), mode=interpolation, **kwargs)  # (T, 3, height, width)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def short_side_size(height: int, width: int, size: int, round_long_side: bool = False) -> tuple[int, int]:
    """Output (height, width) when the shorter side becomes ``size``, keeping the aspect ratio.

    The longer side is ``int(size * long / short)`` as torchvision's ``Resize`` computes it for CLIP, or,
    with ``round_long_side``, ``int(long * size / short + 0.5)`` as mmcv's ``rescale_size`` (the official
    STAN ``Resize(scale=(-1, size))``). The two differ by at most one pixel.
    """
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(long * size / short + 0.5) if round_long_side else int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


def resize_short_side(
    frames: torch.Tensor,
    size: int,
    interpolation: str = "bicubic",
    antialias: bool = True,
    round_long_side: bool = False,
) -> torch.Tensor:
    """Resize so that the shorter side is ``size`` pixels, keeping the aspect ratio.

    Frames whose shorter side is already ``size`` (the decoder resized them) are returned untouched, even if
    the decoder rounded the longer side differently: resampling again by a pixel would only blur.
    """
    frames = to_tchw(frames)
    height, width = frames.shape[-2:]
    if min(height, width) == size:
        return frames
    return resize(frames, short_side_size(height, width, size, round_long_side), interpolation, antialias)


def fit_frames(frames: torch.Tensor, size: int, fit: tuple[str, str] | None = None) -> torch.Tensor:
    """Frames to the model's square input by its checkpoint's rule, `fit = (resize_mode, interpolation)`
    (`PreprocessConfig.fit`): `shortest` resizes the short side then centre-crops (CLIP; the default),
    `squash` resizes the whole frame to `size x size` (SigLIP and PE-Core releases)."""
    resize_mode, interpolation = fit if fit is not None else ("shortest", "bicubic")
    if resize_mode == "squash":
        return resize(to_tchw(frames), (size, size), interpolation)
    return center_crop(resize_short_side(frames, size, interpolation), size)


def crop(frames: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """The same ``(top, left, height, width)`` box from every frame."""
    frames = to_tchw(frames)
    frame_h, frame_w = frames.shape[-2:]
    if top < 0 or left < 0 or height <= 0 or width <= 0 or top + height > frame_h or left + width > frame_w:
        raise ValueError(
            f"crop box (top={top}, left={left}, h={height}, w={width}) outside {frame_h}x{frame_w}"
        )
    return frames[:, :, top : top + height, left : left + width]  # (T, 3, height, width)


def center_crop(frames: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Centre crop to ``size`` (int or (h, w)); the offset rounds like torchvision's ``CenterCrop`` (CLIP)."""
    frames = to_tchw(frames)
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    frame_h, frame_w = frames.shape[-2:]
    if crop_h > frame_h or crop_w > frame_w:
        raise ValueError(f"centre crop {crop_h}x{crop_w} larger than the frames ({frame_h}x{frame_w})")
    top = int(round((frame_h - crop_h) / 2.0))
    left = int(round((frame_w - crop_w) / 2.0))
    return crop(frames, top, left, crop_h, crop_w)


def hflip(frames: torch.Tensor) -> torch.Tensor:
    """Mirror every frame left-right."""
    return to_tchw(frames).flip(-1)


def normalize(
    frames: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """``uint8`` 0..255 (or float 0..1) -> float32 ``(x - mean) / std`` per channel, ``(T, 3, H, W)``."""
    frames = to_tchw(frames)
    unit = 255.0 if frames.dtype == torch.uint8 else 1.0
    std_t = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    scale = (1.0 / (unit * std_t)).float()  # one multiply-add per pixel instead of divide, subtract, divide
    shift = (torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1) / std_t).float()
    x = frames.to(torch.float32, copy=True)
    return x.mul_(scale).sub_(shift)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | int | None = None,
    max_attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random ``(top, left, h, w)`` box covering ``scale`` of the area with aspect ``w/h`` in ``ratio``.

    The draw follows mmaction2's ``RandomResizedCrop.get_crop_bbox`` (the official STAN pipeline): up to
    ``max_attempts`` candidates (log-uniform aspect, uniform area, sizes rounded), the first that fits is
    placed uniformly at random; if none fits, the centred square of the shorter side.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    gen = as_generator(rng)
    area = height * width
    aspect = np.exp(gen.uniform(math.log(ratio[0]), math.log(ratio[1]), size=max_attempts))
    target = gen.uniform(scale[0], scale[1], size=max_attempts) * area
    crop_w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    crop_h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    for w, h in zip(crop_w.tolist(), crop_h.tolist(), strict=True):
        if 0 < h <= height and 0 < w <= width:
            left = int(gen.integers(0, width - w + 1))
            top = int(gen.integers(0, height - h + 1))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def three_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Three ``size x size`` crops spread along the longer side: left/centre/right or top/centre/bottom.

    The shorter side must already equal ``size`` (resize first). Returns ``(3, T, 3, size, size)``.
    """
    frames = to_tchw(frames)
    frame_h, frame_w = frames.shape[-2:]
    if min(frame_h, frame_w) != size:
        raise ValueError(
            f"three_crop needs the shorter side resized to {size} first, got {frame_h}x{frame_w}"
        )
    if frame_w >= frame_h:
        step = (frame_w - size) // 2
        boxes = [(0, 0), (0, step), (0, frame_w - size)]
    else:
        step = (frame_h - size) // 2
        boxes = [(0, 0), (step, 0), (frame_h - size, 0)]
    return torch.stack([crop(frames, top, left, size, size) for top, left in boxes])  # (3, T, 3, S, S)


def _check_short_side(owner: str, size: int, short_side: int | None) -> None:
    if size <= 0:
        raise ConfigError(f"{owner}.size must be positive, got {size}")
    if short_side is not None and short_side < size:
        raise ConfigError(f"{owner}.short_side ({short_side}) must be at least size ({size}) to crop from")


@dataclass
class EvalTransform:
    """CLIP evaluation preprocessing: shortest side to ``short_side`` (default ``size``), centre crop of
    ``size``, CLIP mean/std -> (T, 3, S, S).

    A ``short_side`` above ``size`` is the mmaction2 test pipeline ``Resize(-1, 256), CenterCrop(224)`` (the
    DiDeMo recipes' ``data.test_resize``). ``decode_size`` tells a dataset which shortest side to ask the
    decoder for, so the big resize happens in the decoder's scaler and the Python resize here becomes a no-op.
    """

    size: int = 224
    interpolation: str = "bicubic"
    antialias: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    short_side: int | None = None  # None: size
    resize_mode: str = "shortest"  # `squash`: the whole frame to size x size, no crop (SigLIP, PE-Core)

    def __post_init__(self) -> None:
        _check_interpolation(self.interpolation)
        _check_short_side("EvalTransform", self.size, self.short_side)
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(
                f"EvalTransform.resize_mode must be shortest or squash, got {self.resize_mode!r}"
            )

    @property
    def decode_size(self) -> int:
        return self.short_side if self.short_side is not None else self.size

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        if self.resize_mode == "squash":
            frames = resize(to_tchw(frames), (self.size, self.size), self.interpolation, self.antialias)
            return normalize(frames, self.mean, self.std)  # (T, 3, S, S)
        frames = resize_short_side(frames, self.decode_size, self.interpolation, self.antialias)
        return normalize(center_crop(frames, self.size), self.mean, self.std)  # (T, 3, S, S)


@dataclass
class TrainTransform:
    """Training augmentation: [short side resize], random resized crop to ``size``, [flip], normalize.

    One crop box and one flip decision per clip. ``flip=False`` for Something-Something v2 (direction is
    part of its labels). ``short_side=None`` crops from the frames as decoded.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    flip_prob: float = 0.5
    short_side: int | None = None
    interpolation: str = "bicubic"
    antialias: bool = True
    round_long_side: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _check_interpolation(self.interpolation)
        if self.size <= 0:
            raise ConfigError(f"TrainTransform.size must be positive, got {self.size}")
        if self.short_side is not None and self.short_side <= 0:
            raise ConfigError(f"TrainTransform.short_side must be positive, got {self.short_side}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"TrainTransform.flip_prob must be in [0, 1], got {self.flip_prob}")
        random_resized_crop_box(1, 1, self.scale, self.ratio, rng=0)  # validates scale and ratio

    @property
    def decode_size(self) -> int | None:
        return self.short_side

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        gen = as_generator(rng)
        frames = to_tchw(frames)
        if self.short_side is not None:
            frames = resize_short_side(
                frames, self.short_side, self.interpolation, self.antialias, self.round_long_side
            )
        height, width = frames.shape[-2:]
        top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio, gen)
        frames = crop(frames, top, left, h, w)  # (T, 3, h, w)
        frames = resize(frames, (self.size, self.size), self.interpolation, self.antialias)  # (T, 3, S, S)
        if self.flip and gen.random() < self.flip_prob:
            frames = hflip(frames)
        return normalize(frames, self.mean, self.std)


def stan_train_transform(size: int = 224, short_side: int = 256, flip: bool = False) -> TrainTransform:
    """The official STAN training pipeline: short side 256, mmaction2 RandomResizedCrop, resize to 224.

    mmaction2's ``Resize`` defaults to bilinear (OpenCV, no antialiasing) and the STAN configs add no flip.
    """
    return TrainTransform(
        size=size,
        short_side=short_side,
        flip=flip,
        interpolation="bilinear",
        antialias=False,
        round_long_side=True,
    )


@dataclass
class MultiCropTransform:
    """Test views: shortest side to ``short_side`` (default ``size``), then 3 crops of ``size`` along the longer
    side (or 1 centre crop).

    Returns ``(num_crops, T, 3, S, S)``. Three crops tile the longer side of a frame whose shorter side is
    ``size`` (mmaction2's ``ThreeCrop``), so they need ``short_side == size``; one centre crop takes any
    ``short_side >= size``.
    """

    size: int = 224
    num_crops: int = 3
    interpolation: str = "bicubic"
    antialias: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    short_side: int | None = None  # None: size

    def __post_init__(self) -> None:
        _check_interpolation(self.interpolation)
        if self.num_crops not in (1, 3):
            raise ConfigError(f"MultiCropTransform.num_crops must be 1 or 3, got {self.num_crops}")
        _check_short_side("MultiCropTransform", self.size, self.short_side)
        if self.num_crops == 3 and self.decode_size != self.size:
            raise ConfigError(
                f"MultiCropTransform: three crops need the short side resized to size ({self.size}), "
                f"got short_side {self.short_side}; use one crop, or short_side = size"
            )

    @property
    def decode_size(self) -> int:
        return self.short_side if self.short_side is not None else self.size

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        frames = resize_short_side(frames, self.decode_size, self.interpolation, self.antialias)
        if self.num_crops == 1:
            views = center_crop(frames, self.size).unsqueeze(0)  # (1, T, 3, S, S)
        else:
            views = three_crop(frames, self.size)  # (3, T, 3, S, S)
        n, t = views.shape[:2]
        out = normalize(views.flatten(0, 1), self.mean, self.std)  # (n * T, 3, S, S)
        return out.view(n, t, *out.shape[1:])

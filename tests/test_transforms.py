"""Clip transforms: CLIP's PIL preprocessing as the reference, one random draw per clip, crop geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stanvid.errors import ConfigError
from stanvid.video.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    MultiCropTransform,
    TrainTransform,
    center_crop,
    hflip,
    normalize,
    random_resized_crop_box,
    resize,
    resize_short_side,
    short_side_size,
    stan_train_transform,
    three_crop,
    to_tchw,
)

STD_LEVELS = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255  # one grey level in normalized units


def _clip(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A textured (T, H, W, 3) uint8 clip: smooth blocks plus noise, like decoded video."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(t):
        coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR)).astype(np.int64)
        frames.append(np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(frames))


def _clip_reference(frames: torch.Tensor, size: int) -> torch.Tensor:
    """OpenAI CLIP's `_transform` with PIL: Resize(size, BICUBIC), CenterCrop, ToTensor, Normalize."""
    out = []
    for frame in frames.numpy():
        image = Image.fromarray(frame)
        w, h = image.size
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        x = np.asarray(image, dtype=np.float32) / 255.0
        out.append(((x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


@pytest.mark.parametrize(
    "h,w,size", [(240, 320, 224), (360, 480, 224), (300, 200, 224), (97, 131, 64), (48, 64, 32)]
)
def test_eval_transform_matches_clip_pil_preprocessing(h, w, size):
    frames = _clip(2, h, w, seed=h)
    got = EvalTransform(size)(frames)
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    levels = ((got - _clip_reference(frames, size)) * STD_LEVELS).abs()
    # PIL resamples in fixed point: a grey level apart on a few pixels in ten thousand
    assert levels.max() <= 1.01
    assert (levels > 0.5).float().mean() < 1e-3
    # (T, 3, H, W) input gives the same result
    assert torch.equal(EvalTransform(size)(frames.permute(0, 3, 1, 2)), got)


def test_resize_uint8_matches_pil_bicubic():
    frame = _clip(1, 120, 160, seed=3)
    for new_h, new_w in [(90, 100), (224, 298), (37, 300)]:
        got = resize(frame, (new_h, new_w))[0].permute(1, 2, 0).numpy().astype(np.int64)
        ref = np.asarray(
            Image.fromarray(frame[0].numpy()).resize((new_w, new_h), Image.BICUBIC), dtype=np.int64
        )
        assert np.abs(got - ref).max() <= 1
        assert (got != ref).mean() < 5e-3  # rounding of fixed-point vs float weights


def test_resize_short_side_sizes_and_noop():
    assert short_side_size(240, 320, 224) == (224, 298)  # torchvision/CLIP truncate
    assert short_side_size(240, 320, 256, round_long_side=True) == (256, 341)  # mmcv rounds
    assert short_side_size(320, 240, 224) == (298, 224)
    frames = _clip(2, 224, 300)
    assert resize_short_side(frames, 224).data_ptr() == to_tchw(frames).data_ptr()
    assert resize_short_side(frames, 112).shape == (2, 3, 112, 150)


def test_normalize_values():
    frames = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 2, 3)
    out = normalize(frames)
    for t, value in enumerate([0, 128, 255]):
        for c in range(3):
            expected = (value / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
            assert torch.allclose(out[t, c], torch.full((2, 2), expected), atol=1e-6)


def test_layout_errors():
    with pytest.raises(ValueError, match="ambiguous"):
        to_tchw(torch.zeros(2, 3, 5, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4 dims"):
        to_tchw(torch.zeros(5, 5, 3, dtype=torch.uint8))
    assert to_tchw(torch.zeros(2, 3, 5, 3), layout="tchw").shape == (2, 3, 5, 3)
    assert to_tchw(torch.zeros(2, 3, 5, 3), layout="thwc").shape == (2, 3, 3, 5)


def test_random_resized_crop_box_respects_ranges():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(256, 341, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 341
        assert 0.08 * 0.9 <= h * w / (256 * 341) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # no candidate can fit (full area at aspect 2..3 on a square): the centred square
    assert random_resized_crop_box(100, 100, (1.0, 1.0), (2.0, 3.0), rng) == (0, 0, 100, 100)
    assert random_resized_crop_box(80, 120, (1.0, 1.0), (2.0, 3.0), rng) == (0, 20, 80, 80)
    with pytest.raises(ConfigError, match="scale"):
        random_resized_crop_box(10, 10, (0.0, 1.0))


def test_train_transform_same_crop_and_flip_for_every_frame():
    frame = _clip(1, 96, 128, seed=1)
    frames = frame.expand(6, -1, -1, -1)  # identical frames: any per-frame draw would make them differ
    for seed in range(10):
        out = TrainTransform(size=64, short_side=80)(frames, seed)
        assert out.shape == (6, 3, 64, 64)
        assert torch.equal(out, out[:1].expand_as(out))


def test_train_transform_is_seeded_and_flip_can_be_turned_off():
    frames = _clip(3, 96, 128, seed=2)
    plain = TrainTransform(size=64, flip=True, flip_prob=0.0)
    flipped = TrainTransform(size=64, flip=True, flip_prob=1.0)
    off = TrainTransform(size=64, flip=False, flip_prob=1.0)
    assert torch.equal(plain(frames, 7), plain(frames, 7))
    assert not torch.equal(plain(frames, 7), plain(frames, 8))
    # the crop is drawn before the flip, so the same seed gives the same crop
    assert torch.equal(flipped(frames, 7), hflip(plain(frames, 7)))
    assert torch.equal(off(frames, 7), plain(frames, 7))


def test_stan_train_transform_recipe():
    t = stan_train_transform()
    assert (t.short_side, t.size, t.flip, t.interpolation, t.round_long_side) == (
        256,
        224,
        False,
        "bilinear",
        True,
    )
    frames = _clip(2, 120, 160)
    out = t(frames, 0)
    assert out.shape == (2, 3, 224, 224)
    # the crop comes from the short-side-256 frames: redo it by hand from the same random draws
    rng = np.random.default_rng(0)
    big = resize(frames, (256, 341), "bilinear", antialias=False)
    top, left, h, w = random_resized_crop_box(256, 341, t.scale, t.ratio, rng)
    by_hand = resize(big[:, :, top : top + h, left : left + w], (224, 224), "bilinear", antialias=False)
    assert torch.equal(out, normalize(by_hand))


def test_three_crop_positions():
    wide = _clip(2, 64, 100)
    crops = three_crop(wide, 64)
    assert crops.shape == (3, 2, 3, 64, 64)
    tchw = to_tchw(wide)
    for crop, left in zip(crops, [0, 18, 36], strict=True):
        assert torch.equal(crop, tchw[..., left : left + 64])
    tall = _clip(1, 90, 64)
    crops = three_crop(tall, 64)
    for crop, top in zip(crops, [0, 13, 26], strict=True):
        assert torch.equal(crop, to_tchw(tall)[:, :, top : top + 64])
    with pytest.raises(ValueError, match="shorter side"):
        three_crop(wide, 32)


def test_multi_crop_views_contain_the_centre_view():
    frames = _clip(2, 120, 200)  # short side 120 -> 64: 64 x 106; (106 - 64) = 42 is even
    views = MultiCropTransform(size=64, num_crops=3)(frames)
    assert views.shape == (3, 2, 3, 64, 64)
    assert torch.equal(views[1], EvalTransform(64)(frames))
    single = MultiCropTransform(size=64, num_crops=1)(frames)
    assert single.shape == (1, 2, 3, 64, 64) and torch.equal(single[0], views[1])
    with pytest.raises(ConfigError, match="num_crops"):
        MultiCropTransform(num_crops=5)


def test_test_views_from_a_larger_short_side():
    """``short_side`` above ``size``: mmaction2's ``Resize(-1, 256), CenterCrop(224)`` (data.test_resize)."""
    frames = _clip(2, 120, 200)
    resized = resize_short_side(frames, 80, "bicubic", True)  # 80 x 133
    expected = normalize(center_crop(resized, 64))  # (T, 3, 64, 64)
    centre = EvalTransform(64, short_side=80)
    assert centre.decode_size == 80 and torch.equal(centre(frames), expected)
    one = MultiCropTransform(64, num_crops=1, short_side=80)
    assert one.decode_size == 80 and torch.equal(one(frames), expected.unsqueeze(0))
    assert torch.equal(EvalTransform(64, short_side=64)(frames), EvalTransform(64)(frames))
    with pytest.raises(ConfigError, match=r"three crops need the short side resized to size \(64\)"):
        MultiCropTransform(64, num_crops=3, short_side=80)
    with pytest.raises(ConfigError, match=r"EvalTransform.short_side \(32\) must be at least size \(64\)"):
        EvalTransform(64, short_side=32)


def test_center_crop_offsets_round_like_torchvision():
    frames = torch.arange(7 * 9, dtype=torch.uint8).view(1, 1, 7, 9).expand(1, 3, 7, 9)
    out = center_crop(frames, (4, 4))
    top, left = int(round(3 / 2.0)), int(round(5 / 2.0))
    assert torch.equal(out, frames[:, :, top : top + 4, left : left + 4])

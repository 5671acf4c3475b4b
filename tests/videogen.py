"""Small synthetic videos for tests and benchmarks, written with PyAV.

Every frame carries its own index twice: a binary code band across the top (16 black/white blocks, readable
after lossy compression with `frame_code`) and a colour tint that changes from frame to frame. Under the band a
noisy texture drifts by a few pixels per frame, so the encoder has real motion and residuals to code and two
neighbouring frames never decode to the same pixels: a reader that returns frame i+1 for frame i is caught.

`write_video` chooses the things decoding bugs hide behind: codec, keyframe interval (GOP), B-frames (a fixed
pattern, not left to the encoder's scene analysis), open GOPs, odd sizes (via 4:4:4 or VP9) and variable frame
rate (explicit presentation timestamps with gaps).

    frames = make_frames(40, 48, 64, seed=0)                      # (40, 48, 64, 3) uint8
    write_video(tmp / "a.mp4", frames, fps=25, codec="h264", gop=12, bframes=2)
    write_video(tmp / "b.webm", frames, codec="vp9", gop=10)
    write_video(tmp / "c.mkv", frames, codec="h264", pts=[0, 1, 2, 5, 6, 9, ...])   # VFR: gaps in pts
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# codec name -> the PyAV encoder that writes it
ENCODERS = {
    "h264": "libx264",
    "hevc": "libx265",
    "mpeg4": "mpeg4",
    "vp9": "libvpx-vp9",
    "av1": "libsvtav1",
}

CODE_BITS = 16  # frame indices up to 65535 fit in the code band


def codec_available(codec: str) -> bool:
    """True when PyAV can both encode and decode `codec` (a key of ENCODERS)."""
    try:
        av.Codec(ENCODERS[codec], "w")
        av.Codec(codec, "r")
    except (KeyError, av.codec.codec.UnknownCodecError):
        return False
    return True


def available_codecs() -> list[str]:
    """The codecs of ENCODERS this PyAV build can round-trip, for `pytest.mark.parametrize`."""
    return [c for c in ENCODERS if codec_available(c)]


class FrameRenderer:
    """Renders frame `i` of a synthetic clip on demand, so long videos need not sit in memory."""

    def __init__(self, height: int, width: int, seed: int = 0, noise: int = 6):
        rng = np.random.default_rng(seed)
        self.height, self.width = height, width
        # a blocky texture twice the frame size, cut at a drifting offset: motion the encoder can follow.
        # Values stay in [8, 135] + tint [0, 63] + noise [-noise, noise], so uint8 sums never wrap.
        coarse = rng.integers(0, 128, size=(height // 8 + 3, width // 8 + 3, 3), dtype=np.uint8) + 8
        big = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))
        big = np.concatenate([big, big], axis=0)[: 2 * height + 16]
        self.texture = np.ascontiguousarray(np.concatenate([big, big], axis=1)[:, : 2 * width + 16])
        # a few noise fields cycled over frames: residuals to code without drawing noise per frame;
        # stored as uint8 two's complement so adding them is a wrapping add of a small signed number
        noise = min(noise, 8)
        self.noise = (
            rng.integers(-noise, noise + 1, size=(7, height, width, 3)).astype(np.uint8) if noise else None
        )
        self.band = max(2, height // 8)
        self.block = width // CODE_BITS

    def __call__(self, i: int) -> np.ndarray:
        h, w = self.height, self.width
        dy, dx = (3 * i) % (self.texture.shape[0] - h), (5 * i) % (self.texture.shape[1] - w)
        img = self.texture[dy : dy + h, dx : dx + w].copy()  # (H, W, 3)
        img += np.array([(37 * i) % 64, (91 * i) % 64, (53 * i) % 64], dtype=np.uint8)
        if self.noise is not None:
            img += self.noise[i % len(self.noise)]
        if self.block >= 1:
            bits = (i >> np.arange(CODE_BITS - 1, -1, -1)) & 1  # most significant bit first
            row = np.repeat(bits * 255, self.block).astype(np.uint8)
            img[: self.band, : row.size] = row[None, :, None]
        return img


def iter_frames(num: int, height: int, width: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The frames of `make_frames` one at a time (H, W, 3) uint8, for videos too long to hold in memory."""
    render = FrameRenderer(height, width, seed)
    for i in range(num):
        yield render(i)


def make_frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """`num` distinct RGB frames (num, height, width, 3) uint8; frame i shows `i` in its code band."""
    out = np.empty((num, height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(iter_frames(num, height, width, seed)):
        out[i] = frame
    return out


def frame_code(frame: np.ndarray) -> int:
    """Read back the frame index drawn by `make_frames` from a decoded (H, W, 3) uint8 RGB frame.

    Works after lossy compression as long as a code block is at least ~3 pixels wide (width >= 48) and the
    frame was not resized.
    """
    height, width = frame.shape[:2]
    band, block = max(2, height // 8), width // CODE_BITS
    if block < 1:
        raise ValueError(f"frame width {width} is too small to carry a {CODE_BITS}-bit code")
    strip = frame[:band, : block * CODE_BITS].astype(np.float32).mean(axis=(0, 2))  # (W,)
    # read the centre of each block: edges bleed into neighbours after chroma subsampling and deblocking
    lo, hi = block // 4, block - block // 4
    levels = strip.reshape(CODE_BITS, block)[:, lo : max(hi, lo + 1)].mean(axis=1)
    value = 0
    for level in levels:
        value = (value << 1) | int(level > 127)
    return value


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    *,
    fps: float = 25,
    codec: str = "h264",
    gop: int = 12,
    bframes: int = 2,
    pix_fmt: str = "yuv420p",
    pts: Sequence[int] | None = None,
    open_gop: bool = False,
    quality: int | None = None,
    preset: str | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode RGB frames (T, H, W, 3) uint8 (or an iterable of (H, W, 3)) to `path`; returns the path.

    The container follows the suffix (.mp4 .mkv .webm .mov .avi .ts; .h264 writes a raw stream without
    timestamps). `gop` is the exact keyframe interval (scene cut detection off), `bframes` the number of
    B-frames between references in a fixed pattern (x264/x265 with b-pyramid, so some B-frames are references
    and some are not), `open_gop` lets B-frames before a keyframe reference the previous GOP (x264/x265).
    `pts` gives each frame's presentation time in units of 1/fps; gaps make the rate variable. `quality` is the
    codec's quantiser/crf (lower is better; default near-lossless so `frame_code` can read the band).
    `options` are passed to the encoder as-is, `container_options` to the muxer (e.g.
    `{"movflags": "faststart"}` puts an MP4's index before its data, as web videos have it).
    """
    if codec not in ENCODERS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(ENCODERS)}")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    it = iter(frames)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("write_video needs at least one frame") from None
    height, width = first.shape[:2]
    opts = _encoder_options(codec, gop, bframes, open_gop, quality, preset)
    opts.update(options or {})
    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(ENCODERS[codec], rate=rate, options=opts)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.gop_size = gop
        if codec == "mpeg4":
            stream.codec_context.max_b_frames = bframes
            stream.codec_context.qscale = quality or 2
            stream.codec_context.flags |= av.codec.context.Flags.qscale
        for i, rgb in enumerate(_chain(first, it)):
            if rgb.shape[:2] != (height, width):
                raise ValueError(f"frame {i} has size {rgb.shape[:2]}, the first frame {(height, width)}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                format=pix_fmt
            )
            frame.pts = i if pts is None else int(pts[i])
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _encoder_options(
    codec: str, gop: int, bframes: int, open_gop: bool, quality: int | None, preset: str | None
) -> dict[str, str]:
    if codec == "h264":
        params = (
            f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:b-adapt=0:open-gop={int(open_gop)}"
        )
        return {"preset": preset or "veryfast", "crf": str(quality or 12), "x264-params": params}
    if codec == "hevc":
        params = (
            f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:b-adapt=0:open-gop={int(open_gop)}"
            ":log-level=error"
        )
        return {"preset": preset or "ultrafast", "crf": str(quality or 12), "x265-params": params}
    if codec == "vp9":
        # lag-in-frames with auto-alt-ref makes hidden alt-ref frames (VP9 superframes), the case to test
        return {
            "crf": str(quality or 12),
            "b": "0",
            "deadline": preset or "good",
            "cpu-used": "8",
            "g": str(gop),
            "keyint_min": str(gop),
            "lag-in-frames": "8",
            "auto-alt-ref": "1",
        }
    if codec == "av1":
        return {"preset": preset or "12", "crf": str(quality or 20), "g": str(gop), "svtav1-params": "scd=0"}
    return {}


def remux_rotated(src: str | Path, dst: str | Path, degrees: int) -> Path:
    """`src`'s packets, unchanged, in `dst` (MP4/MOV) with a display matrix of `degrees` counter-clockwise: the
    file a phone writes for a video it stores sideways. Same bitstream, so the stored frames are bit-identical."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        target = out.add_stream_from_template(stream)
        target.set_display_rotation(degrees)
        for packet in inp.demux(stream):
            if packet.dts is not None:  # the demuxer's end-of-stream marker has none
                packet.stream = target
                out.mux(packet)
    return Path(dst)

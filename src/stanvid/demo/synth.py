"""The demo's video-text corpus: coloured shapes on a plain background, written as real encoded video files.

Two kinds of caption:

* **appearance** ("a red circle"): answerable from any single frame. Each test object appears in exactly one
  test clip, so every appearance query has one right answer.
* **order-only** ("a red circle moves to the right" / "... to the left", "... grows big" / "... shrinks
  small", "nothing then a red circle" / "a red circle then nothing", "a red circle turns into a red square" /
  the other way round): every order clip comes with its
  **reversal** in the same split, captioned with the opposite order. A clip and its reversal hold the same
  frames, so a model that ignores frame order gives them the same score for any query: among such a pair it
  can only guess. Each (object, motion) pair is used by one test group only, so an order query's competitors
  that share its frames are exactly its reversal.

What the model sees must keep that property, not only the files: the dataset samples ``T`` frames per clip
with `stanvid.uniform_indices`, whose test indices for a file of ``2T + 1`` frames are ``1, 3, ..., 2T - 1``,
a set that maps onto itself when the clip is reversed (frame ``i`` <-> ``2T - i``). Files therefore have
``2T + 1`` frames (`clip_frames`), and the encoding is lossless (H.264 at qp 0, 4:4:4) so a reversed file
decodes to exactly the reversed frames (tests/test_demo.py checks both).

Three splits: ``pretrain`` (clips whose object roams and changes size, plus empty clips, for the image-text
pretraining; their per-frame position and size are recorded so single frames can be captioned), ``train``
and ``test``. They are disjoint: different renders (positions, sizes, speeds, switch times, background,
tints), never the same file; the (object, motion) combinations themselves are shared, as captions are in
MSR-VTT.

Files written under ``root``: ``videos/<id>.mp4``, ``train.csv``, ``test_appearance.csv``, ``test_order.csv``
(``video,caption``: `stanvid.data.load_video_captions` reads them) and ``corpus.jsonl`` (every clip with its
split, kind, group, reversal partner and attributes).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm.auto import tqdm

from stanvid.data import RetrievalAnnotations, load_video_captions
from stanvid.errors import ConfigError
from stanvid.fileio import atomic_path, atomic_write_text
from stanvid.video.decode import probe, read_frames
from stanvid.video.held import DecodedVideo

__all__ = [
    "COLOURS",
    "SHAPES",
    "ORDER_MOTIONS",
    "CorpusConfig",
    "ClipRecord",
    "Corpus",
    "clip_frames",
    "render_clip",
    "write_video",
    "make_corpus",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (55, 90, 245),
    "yellow": (240, 215, 35),
    "white": (240, 240, 240),
    "purple": (165, 55, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
# motion -> caption templates played forward / reversed ({o}: "a red circle", {b}: the morph's second object).
# The words that carry the order are words single frames taught the CLIP in pretraining (right/left,
# big/small, nothing, the shapes): see `stanvid.demo.pretrain` for why that matters.
ORDER_MOTIONS: dict[str, tuple[str, str]] = {
    "horizontal": ("{o} moves to the right", "{o} moves to the left"),
    "size": ("{o} grows big", "{o} shrinks small"),
    "visibility": ("nothing then {o}", "{o} then nothing"),
    "morph": ("{o} turns into {b}", "{o} turns into {b}"),
}
NOTHING = "nothing"  # the caption of a frame without an object
_SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: smooth edges and sub-pixel motion


@dataclass
class CorpusConfig:
    """Size of the corpus. `num_frames` is what the model samples per clip; files hold `2 * num_frames + 1`."""

    image_size: int = 32
    num_frames: int = 8
    fps: int = 16
    pretrain_per_object: int = 24
    pretrain_empty: int = 24  # pretraining clips that show no object ("nothing")
    train_appearance_per_object: int = 8
    train_order_groups: int = 240
    test_order_groups: int = 36
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    seed: int = 0

    def __post_init__(self) -> None:
        names = (
            "image_size",
            "num_frames",
            "fps",
            "pretrain_per_object",
            "train_appearance_per_object",
            "train_order_groups",
        )
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"CorpusConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.pretrain_empty, int) or self.pretrain_empty < 0:
            raise ConfigError(
                f"CorpusConfig.pretrain_empty must be a non-negative integer, got {self.pretrain_empty!r}"
            )
        if self.image_size < 24 or self.image_size % 2:
            raise ConfigError(f"CorpusConfig.image_size must be an even number >= 24, got {self.image_size}")
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ConfigError(
                f"CorpusConfig: unknown colour/shape {unknown}; known: {list(COLOURS)}, {list(SHAPES)}"
            )
        if len(self.shapes) < 2:
            raise ConfigError(
                "CorpusConfig.shapes needs at least two shapes (the morph motion changes shape)"
            )
        combos = len(_order_combos(self.colours, self.shapes))
        if not 0 < self.test_order_groups <= combos:
            raise ConfigError(
                f"CorpusConfig.test_order_groups must be in [1, {combos}] (one test group per object and motion), "
                f"got {self.test_order_groups}"
            )


@dataclass
class ClipRecord:
    """One clip of the corpus (a line of ``corpus.jsonl``)."""

    video: str  # id: the file is videos/<video>.mp4
    caption: str
    split: str  # pretrain (image-text pretraining frames) | train | test
    kind: str  # appearance | order
    colour: str
    shape: str
    motion: str  # still / wander (appearance clips) or a key of ORDER_MOTIONS
    shape_b: str | None = None  # the second shape of a morph, in the order played
    reversed: bool = False  # the clip is its group's forward render played backwards
    group: int = -1  # order clips: the two clips of a group are reversals of each other
    partner: str | None = None  # order clips: the id of the reversal
    track: dict[str, list[float]] | None = None  # pretraining clips: per-frame "x" (centre) and "r" (radius)
    # as fractions of the frame width, for captions of single frames


@dataclass
class Corpus:
    """A generated corpus on disk (see the module docstring for the layout).

    After `hold`, every clip is also held decoded in memory and `source` / `annotations` serve the held frames
    (the same frames as the files, `stanvid.video.held`): the demo decodes each file once, not once per item
    per step, and needs no decoding worker processes.
    """

    root: Path
    config: CorpusConfig
    clips: list[ClipRecord] = field(default_factory=list)
    held: dict[str, DecodedVideo] = field(default_factory=dict, repr=False)  # video id -> its frames

    @property
    def video_dir(self) -> Path:
        return self.root / "videos"

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    @property
    def test_appearance_csv(self) -> Path:
        return self.root / "test_appearance.csv"

    @property
    def test_order_csv(self) -> Path:
        return self.root / "test_order.csv"

    @property
    def jsonl(self) -> Path:
        return self.root / "corpus.jsonl"

    def select(self, split: str, kind: str | None = None) -> list[ClipRecord]:
        return [c for c in self.clips if c.split == split and (kind is None or c.kind == kind)]

    def path(self, video: str) -> Path:
        return self.video_dir / f"{video}.mp4"

    def hold(self, progress: bool = False) -> int:
        """Decode every clip's file once (`DecodedVideo.decode`) and keep its frames; returns the bytes held."""
        bar = tqdm(
            self.clips, desc="data: decoding into memory", unit="clip", disable=not progress, leave=False
        )
        for clip in bar:
            if clip.video not in self.held:
                path = self.path(clip.video)
                info = probe(path)
                frames = read_frames(path, np.arange(info.num_frames))  # (F, S, S, 3)
                self.held[clip.video] = DecodedVideo(frames, name=str(path), fps=info.fps)
        return sum(video.nbytes for video in self.held.values())

    def source(self, video: str) -> Path | DecodedVideo:
        """What to read clip `video` from: its held frames after `hold`, else its file."""
        return self.held.get(video) or self.path(video)

    def annotations(self, csv: Path) -> RetrievalAnnotations:
        """One of the corpus's caption files, its videos read from `source` (held frames after `hold`)."""
        annotations = load_video_captions(csv, self.video_dir)
        if not self.held:
            return annotations
        # a list's bound __getitem__ pickles, should a loader hand the annotations to worker processes
        sources = [self.source(video) for video in annotations.video_ids]
        return replace(annotations, sources=sources.__getitem__)


def clip_frames(num_frames: int) -> int:
    """Frames per file so that the test sampling of `num_frames` frames is the same set on a reversed clip."""
    return 2 * num_frames + 1


# ---------------------------------------------------------------------------------------------- rendering
def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inside-test of a shape of radius r centred at the origin; dx, dy, r broadcast."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":  # apex up, base 0.75 r below the centre
        return (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= (dy + r) / 1.75)
    if shape == "cross":
        bar = 0.34 * r
        return ((np.abs(dx) <= bar) & (np.abs(dy) <= r)) | ((np.abs(dy) <= bar) & (np.abs(dx) <= r))
    raise ConfigError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@dataclass
class _Track:
    """Per-frame state of the one object in a clip (arrays of length F)."""

    cx: np.ndarray
    cy: np.ndarray
    r: np.ndarray
    shape: list[str]
    visible: np.ndarray


def _draw(track: _Track, size: int, colour: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(F, size, size, 3) uint8 frames of `track`."""
    n = len(track.cx)
    k = _SUPERSAMPLE
    coords = (np.arange(size * k) + 0.5) / k  # sub-pixel centres in pixel units
    xs, ys = coords[None, None, :], coords[None, :, None]
    alpha = np.zeros((n, size * k, size * k), dtype=np.float32)
    for shape in set(track.shape):
        frames = np.array([s == shape for s in track.shape]) & track.visible  # (F,)
        if not frames.any():
            continue
        dx = xs - track.cx[frames, None, None]
        dy = ys - track.cy[frames, None, None]
        alpha[frames] = _shape_mask(shape, dx, dy, track.r[frames, None, None])
    alpha = alpha.reshape(n, size, k, size, k).mean(axis=(2, 4))[..., None]  # (F, S, S, 1)
    img = background * (1.0 - alpha) + colour * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _track(
    motion: str, shape: str, shape_b: str | None, frames: int, size: int, rng: np.random.Generator
) -> _Track:
    """A random render of `motion`, played forward (left to right, growing, appearing, shape -> shape_b)."""
    t = np.linspace(0.0, 1.0, frames)
    visible = np.ones(frames, dtype=bool)
    shapes = [shape] * frames
    if motion == "empty":
        r, cx, cy = np.zeros(frames), np.zeros(frames), np.zeros(frames)
        visible[:] = False
    elif motion in ("still", "wander"):
        # appearance clips: a slow drift in a random direction, nothing to caption; pretraining clips
        # ("wander") roam and change size, so their frames are many different images of the object
        r0, r1 = rng.uniform(0.13 if motion == "wander" else 0.14, 0.25, size=2) * size
        r = r0 + (r1 - r0) * t if motion == "wander" else np.full(frames, r0)
        reach = size if motion == "wander" else 0.08 * size
        cx0, cy0 = rng.uniform(r[0] + 1, size - r[0] - 1, size=2)
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, reach)
        cx = np.clip(cx0 + np.cos(angle) * dist * t, r + 1, size - r - 1)
        cy = np.clip(cy0 + np.sin(angle) * dist * t, r + 1, size - r - 1)
    elif motion == "horizontal":
        r = np.full(frames, rng.uniform(0.12, 0.19) * size)
        x0 = rng.uniform(r[0] + 1, r[0] + 0.15 * size)
        x1 = rng.uniform(size - r[0] - 0.15 * size, size - r[0] - 1)
        cx = x0 + (x1 - x0) * t
        cy = np.full(frames, rng.uniform(r[0] + 1, size - r[0] - 1))
    elif motion == "size":
        r0, r1 = rng.uniform(0.07, 0.11) * size, rng.uniform(0.22, 0.28) * size
        r = r0 + (r1 - r0) * t
        cx = np.full(frames, rng.uniform(r1 + 1, size - r1 - 1))
        cy = np.full(frames, rng.uniform(r1 + 1, size - r1 - 1))
    elif motion in ("visibility", "morph"):
        r = np.full(frames, rng.uniform(0.15, 0.23) * size)
        cx = np.full(frames, rng.uniform(r[0] + 1, size - r[0] - 1))
        cy = np.full(frames, rng.uniform(r[0] + 1, size - r[0] - 1))
        switch = int(rng.integers(frames * 5 // 17, frames - frames * 5 // 17))  # the change happens mid-clip
        if motion == "visibility":
            visible[:switch] = False
        else:
            assert shape_b is not None
            shapes = [shape] * switch + [shape_b] * (frames - switch)
    else:
        raise ConfigError(
            f"unknown motion {motion!r}; known: still, wander, empty, {', '.join(ORDER_MOTIONS)}"
        )
    return _Track(cx=cx, cy=cy, r=r, shape=shapes, visible=visible)


def render_clip(
    colour: str,
    shape: str,
    motion: str,
    *,
    shape_b: str | None = None,
    num_frames: int = 8,
    size: int = 32,
    rng: np.random.Generator | int | None = None,
    return_track: bool = False,
):
    """One random forward render, ``(clip_frames(num_frames), size, size, 3)`` uint8; reverse it with ``[::-1]``.

    With `return_track`, also the per-frame ``{"x": centre, "r": radius}`` as fractions of the frame width.
    """
    if motion != "empty" and colour not in COLOURS:
        raise ConfigError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    if motion == "morph" and (shape_b is None or shape_b == shape):
        raise ConfigError("a morph needs a second shape different from the first (shape_b)")
    rng = np.random.default_rng(rng)
    frames = clip_frames(num_frames)
    track = _track(motion, shape, shape_b, frames, size, rng)
    background = np.full(3, rng.uniform(0, 60)) + rng.uniform(-8, 8, size=3)
    tint = np.asarray(COLOURS.get(colour, (0, 0, 0)), dtype=np.float64) + rng.uniform(-12, 12, size=3)
    video = _draw(track, size, np.clip(tint, 0, 255), np.clip(background, 0, 255))
    if not return_track:
        return video
    fractions = {"x": (track.cx / size).round(4).tolist(), "r": (track.r / size).round(4).tolist()}
    return video, fractions


def write_video(path: str | Path, frames: np.ndarray, fps: int = 16) -> Path:
    """Encode (F, H, W, 3) uint8 RGB losslessly (H.264 qp 0, 4:4:4): every frame decodes back identically,
    which is what makes a file and its reversal frame-set identical after decoding."""
    path = Path(path)
    height, width = frames.shape[1:3]
    # a named temporary (PyAV picks the container from its suffix), renamed when complete
    with (
        atomic_path(path, f".{path.stem}.partial{path.suffix}") as tmp,
        av.open(str(tmp), mode="w") as container,
    ):
        stream = container.add_stream(
            "libx264", rate=Fraction(fps), options={"qp": "0", "preset": "ultrafast"}
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


# ---------------------------------------------------------------------------------------------- captions
def _object(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def _order_caption(colour: str, shape: str, motion: str, shape_b: str | None, reverse: bool) -> str:
    """The caption of a forward (``reverse=False``) or reversed render."""
    first, second = (shape_b, shape) if (motion == "morph" and reverse) else (shape, shape_b)
    second_object = _object(colour, second) if second else ""
    return ORDER_MOTIONS[motion][int(reverse)].format(o=_object(colour, first), b=second_object)


def _order_combos(
    colours: tuple[str, ...], shapes: tuple[str, ...]
) -> list[tuple[str, str, str, str | None]]:
    """Every (colour, shape, motion, shape_b) an order group can show; a morph pair is listed once."""
    combos: list[tuple[str, str, str, str | None]] = []
    for colour in colours:
        for shape in shapes:
            for motion in ("horizontal", "size", "visibility"):
                combos.append((colour, shape, motion, None))
        for i, a in enumerate(shapes):
            for b in shapes[i + 1 :]:
                combos.append((colour, a, "morph", b))
    return combos


# ---------------------------------------------------------------------------------------------- corpus
def _plan(config: CorpusConfig) -> list[dict]:
    """What to render: one dict per group (appearance clips are groups of one), ids fixed by position."""
    rng = np.random.default_rng([config.seed, 1])
    objects = [(c, s) for c in config.colours for s in config.shapes]
    combos = _order_combos(config.colours, config.shapes)
    plan: list[dict] = []
    splits = (
        ("pretrain", config.pretrain_per_object, "wander"),
        ("train", config.train_appearance_per_object, "still"),
        ("test", 1, "still"),
    )
    for split, per_object, motion in splits:
        for colour, shape in objects:
            for _ in range(per_object):
                plan.append(
                    {"split": split, "kind": "appearance", "colour": colour, "shape": shape, "motion": motion}
                )
        if split == "pretrain":
            for _ in range(config.pretrain_empty):
                plan.append(
                    {"split": split, "kind": "appearance", "colour": "", "shape": "", "motion": "empty"}
                )
    test_combos = rng.permutation(len(combos))[: config.test_order_groups]
    train_combos = rng.integers(0, len(combos), size=config.train_order_groups)
    for split, chosen in (("train", train_combos), ("test", test_combos)):
        for index in chosen:
            colour, shape, motion, shape_b = combos[int(index)]
            if motion == "morph" and rng.random() < 0.5:
                shape, shape_b = shape_b, shape  # which shape the forward render starts with
            plan.append(
                {
                    "split": split,
                    "kind": "order",
                    "colour": colour,
                    "shape": shape,
                    "motion": motion,
                    "shape_b": shape_b,
                }
            )
    return plan


def _write_captions(path: Path, clips: list[ClipRecord]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["video", "caption"])
    for clip in clips:
        writer.writerow([clip.video, clip.caption])
    atomic_write_text(path, buf.getvalue())


def make_corpus(
    root: str | Path,
    config: CorpusConfig | None = None,
    progress: bool = True,
    on_clip: Callable[[ClipRecord, np.ndarray], None] | None = None,
) -> Corpus:
    """Render and encode the corpus under `root` (see the module docstring); returns its index.

    Every clip is rendered from its own seed ``(config.seed, 2, group index)``, so a corpus is a pure
    function of its config. `on_clip(record, frames)` sees each clip's rendered frames as it is written.
    """
    config = config or CorpusConfig()
    corpus = Corpus(root=Path(root), config=config)
    corpus.video_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(config)
    counters = {"pretrain": 0, "train": 0, "test": 0}
    bar = tqdm(plan, desc="data: rendering clips", unit="group", disable=not progress, leave=False)
    for g, item in enumerate(bar):
        rng = np.random.default_rng([config.seed, 2, g])
        frames, track = render_clip(
            item["colour"],
            item["shape"],
            item["motion"],
            shape_b=item.get("shape_b"),
            num_frames=config.num_frames,
            size=config.image_size,
            rng=rng,
            return_track=True,
        )  # (F, S, S, 3)
        split = item["split"]
        base = f"{split}-{counters[split]:04d}"
        counters[split] += 1
        if item["kind"] == "appearance":
            caption = NOTHING if item["motion"] == "empty" else _object(item["colour"], item["shape"])
            records = [
                (
                    ClipRecord(
                        video=base,
                        caption=caption,
                        split=split,
                        kind="appearance",
                        colour=item["colour"],
                        shape=item["shape"],
                        motion=item["motion"],
                        track=track if split == "pretrain" else None,
                    ),
                    frames,
                )
            ]
        else:
            records = []
            for suffix, reverse in (("f", False), ("r", True)):
                shape_b = item["shape_b"]
                played_b = (item["shape"] if reverse else shape_b) if shape_b else None
                records.append(
                    (
                        ClipRecord(
                            video=f"{base}{suffix}",
                            caption=_order_caption(
                                item["colour"], item["shape"], item["motion"], shape_b, reverse
                            ),
                            split=split,
                            kind="order",
                            colour=item["colour"],
                            shape=(shape_b if reverse and shape_b else item["shape"]),
                            motion=item["motion"],
                            shape_b=played_b,
                            reversed=reverse,
                            group=g,
                            partner=f"{base}{'r' if suffix == 'f' else 'f'}",
                        ),
                        frames[::-1] if reverse else frames,
                    )
                )
        for record, clip in records:
            write_video(corpus.path(record.video), clip, config.fps)
            corpus.clips.append(record)
            if on_clip is not None:
                on_clip(record, clip)
    _write_captions(corpus.train_csv, corpus.select("train"))
    _write_captions(corpus.test_appearance_csv, corpus.select("test", "appearance"))
    _write_captions(corpus.test_order_csv, corpus.select("test", "order"))
    atomic_write_text(corpus.jsonl, "".join(json.dumps(asdict(clip)) + "\n" for clip in corpus.clips))
    return corpus

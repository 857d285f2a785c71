"""A synthetic video world: one filled shape moving in a straight line, with its caption.

Captions follow ``a {color} {shape} moving {direction}`` optionally followed by ``on a {background}
background``; an unnamed background is black. Everything here is numpy and deterministic given a seed.

The world is made of tables (``COLORS``, ``SHAPES``, ``DIRECTIONS``, ``BACKGROUNDS``) and a ``Vocab`` that
picks which rows a dataset uses. A new concept is a new table row: the shapes ``wedge`` (a triangle pointing
down) and ``star`` are defined here but left out of ``DEFAULT_VOCAB``: they are concepts a LoRA fine-tune
teaches (issue 7).

Held-out compositions (``HELDOUT``) never appear in training captions: ``sample_spec`` rejects any spec
whose caption contains all the words of a held-out line; ``heldout_prompts`` gives prompts that test them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

RGB = tuple[int, int, int]

COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
}

BACKGROUNDS: dict[str, RGB] = {"black": (15, 15, 15), "gray": (100, 100, 100)}
DEFAULT_BACKGROUND = "black"

# Unit motion in image coordinates: x to the right, y downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _polygon(vertices: list[tuple[float, float]]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Even-odd point-in-polygon test for a simple (possibly concave) polygon."""
    vx, vy = np.array(vertices, dtype=np.float64).T

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        result = np.zeros(np.broadcast(u, v).shape, dtype=bool)
        for x1, y1, x2, y2 in zip(vx, vy, np.roll(vx, -1), np.roll(vy, -1)):
            if y1 == y2:
                continue
            crosses = (y1 > v) != (y2 > v)
            x_at_v = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
            result ^= crosses & (u < x_at_v)
        return result

    return inside


def _star_vertices(points: int = 5) -> list[tuple[float, float]]:
    """An upright regular star, scaled so its widest extent spans [-1, 1] and centred in its box."""
    outer = 1.0
    inner = outer * math.sin(math.radians(18)) / math.sin(math.radians(54))  # regular pentagram ratio
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    xy = [
        ((outer, inner)[k % 2] * math.cos(a), (outer, inner)[k % 2] * math.sin(a))
        for k, a in enumerate(angles)
    ]
    xs, ys = zip(*xy)
    scale = 2.0 / max(max(xs) - min(xs), max(ys) - min(ys))
    x_mid, y_mid = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [((x - x_mid) * scale, (y - y_mid) * scale) for x, y in xy]


# Each shape is an inside test in box coordinates: u, v in [-1, 1] across the shape's size, v downwards.
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0),
    "triangle": _polygon([(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "star": _polygon(_star_vertices()),
    # The upright triangle turned upside down: a new shape that the embedded model's VAE still reconstructs.
    "wedge": _polygon([(-1.0, -1.0), (1.0, -1.0), (0.0, 1.0)]),
}

HELDOUT: tuple[str, ...] = (
    "red triangle",
    "blue circle",
    "yellow square",
    "green triangle",
    "white square",
    "triangle moving up",
    "circle moving left",
)


def check_name(name: str, table: dict, kind: str) -> None:
    """Raise ValueError naming ``name``, the valid choices and the nearest one, unless it is in ``table``."""
    if name not in table:
        near = difflib.get_close_matches(name, list(table), n=1, cutoff=0.0)
        raise ValueError(
            f"unknown {kind} {name!r}: must be one of {sorted(table)}; did you mean {near[0]!r}?"
        )


@dataclass(frozen=True)
class Vocab:
    """Which table rows a dataset draws from (names only; the tables hold their definitions)."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    directions: tuple[str, ...]
    backgrounds: tuple[str, ...]

    def __post_init__(self) -> None:
        for field, table in (
            ("colors", COLORS),
            ("shapes", SHAPES),
            ("directions", DIRECTIONS),
            ("backgrounds", BACKGROUNDS),
        ):
            names = getattr(self, field)
            if not names:
                raise ValueError(f"Vocab.{field} is empty; it needs at least one of {sorted(table)}")
            for name in names:
                check_name(name, table, field[:-1])


DEFAULT_VOCAB = Vocab(
    colors=tuple(COLORS),
    shapes=("circle", "square", "triangle"),
    directions=tuple(DIRECTIONS),
    backgrounds=tuple(BACKGROUNDS),
)
FULL_VOCAB = Vocab(
    colors=tuple(COLORS), shapes=tuple(SHAPES), directions=tuple(DIRECTIONS), backgrounds=tuple(BACKGROUNDS)
)

# Sampling bounds, as fractions of the frame (size: of its shorter side; travel: of the moving axis).
SIZE_RANGE = (0.25, 0.40)
TRAVEL_RANGE = (0.40, 0.55)
NAMED_BLACK_PROBABILITY = 0.5


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip.

    ``start`` is the shape's centre in the first frame as (x, y) fractions of the frame width and height;
    ``size`` is the shape's box side as a fraction of the frame's shorter side; ``travel`` is how far the
    centre moves over the whole clip, as a fraction of the frame along the direction of motion.
    """

    color: str
    shape: str
    direction: str
    background: str = DEFAULT_BACKGROUND
    named_background: bool = False
    start: tuple[float, float] = (0.5, 0.5)
    size: float = 0.3
    travel: float = 0.45


def caption(spec: ClipSpec) -> str:
    """The caption of a clip, e.g. ``a red circle moving right on a gray background``."""
    words = caption_words(spec.color, spec.shape, spec.direction, spec.background, spec.named_background)
    return " ".join(words)


def caption_words(
    color: str,
    shape: str,
    direction: str,
    background: str = DEFAULT_BACKGROUND,
    named_background: bool = False,
) -> list[str]:
    """The words of the caption of the grammar with these fields (the background only when named)."""
    words = ["a", color, shape, "moving", direction]
    return words + (["on", "a", background, "background"] if named_background else [])


def parse_caption(text: str) -> dict[str, str | bool]:
    """Read color, shape, direction, background and named_background back from a caption.

    Any name in the tables is accepted (``star`` included). Raises ValueError naming the offending word
    and the nearest valid choice when the text does not follow the grammar.
    """
    words = text.strip().lower().rstrip(".").split()
    grammar = "'a {color} {shape} moving {direction}[ on a {background} background]'"
    if len(words) not in (5, 9) or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"caption {text!r} does not follow the grammar {grammar}")
    if len(words) == 9 and (words[5:7] != ["on", "a"] or words[8] != "background"):
        raise ValueError(f"caption {text!r} does not follow the grammar {grammar}")
    check_name(words[1], COLORS, "color")
    check_name(words[2], SHAPES, "shape")
    check_name(words[4], DIRECTIONS, "direction")
    named = len(words) == 9
    background = words[7] if named else DEFAULT_BACKGROUND
    check_name(background, BACKGROUNDS, "background")
    return {
        "color": words[1],
        "shape": words[2],
        "direction": words[4],
        "background": background,
        "named_background": named,
    }


def heldout_lines(text: str) -> set[str]:
    """The held-out lines (compositions) whose every word appears in ``text`` as a whole word."""
    words = set(text.lower().split())
    return {line for line in HELDOUT if set(line.split()) <= words}


def is_heldout(text: str) -> bool:
    """True when ``text`` contains all the words of at least one held-out composition."""
    return bool(heldout_lines(text))


def sample_spec(
    rng: np.random.Generator, vocab: Vocab = DEFAULT_VOCAB, allow_heldout: bool = False
) -> ClipSpec:
    """Draw a random clip; training draws (the default) never have a held-out caption.

    The object stays wholly inside the frame for the whole clip and travels 40-55% of the frame. Held-out
    draws are rejected and drawn again, so training clips are uniform over the allowed compositions.
    """
    for _ in range(1000):
        spec = _draw(rng, vocab)
        if allow_heldout or not is_heldout(caption(spec)):
            return spec
    raise ValueError(f"every composition of {vocab} is held out; add colors, shapes or directions")


def _draw(rng: np.random.Generator, vocab: Vocab) -> ClipSpec:
    color = vocab.colors[rng.integers(len(vocab.colors))]
    shape = vocab.shapes[rng.integers(len(vocab.shapes))]
    direction = vocab.directions[rng.integers(len(vocab.directions))]
    background = vocab.backgrounds[rng.integers(len(vocab.backgrounds))]
    # An unnamed background means black, so only black may go unnamed.
    named = background != DEFAULT_BACKGROUND or bool(rng.random() < NAMED_BLACK_PROBABILITY)
    size = float(rng.uniform(*SIZE_RANGE))
    travel = float(rng.uniform(TRAVEL_RANGE[0], min(TRAVEL_RANGE[1], 1.0 - size)))
    half = size / 2  # a fraction of the shorter side is at most that fraction of either axis
    start = []
    for step in DIRECTIONS[direction]:
        lo, hi = half, 1.0 - half
        if step > 0:
            hi -= travel
        elif step < 0:
            lo += travel
        start.append(float(rng.uniform(lo, hi)))
    return ClipSpec(color, shape, direction, background, named, (start[0], start[1]), size, travel)


def spec_at(seed: int, index: int, vocab: Vocab = DEFAULT_VOCAB, allow_heldout: bool = False) -> ClipSpec:
    """The ``index``-th training clip of dataset ``seed``: random access, so training can resume anywhere."""
    return sample_spec(np.random.default_rng([seed, index]), vocab, allow_heldout)


def centers(spec: ClipSpec, frames: int) -> np.ndarray:
    """Centre of the shape in every frame as (x, y) frame fractions, shape (frames, 2)."""
    dx, dy = DIRECTIONS[spec.direction]
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    return np.stack([spec.start[0] + dx * spec.travel * t, spec.start[1] + dy * spec.travel * t], axis=1)


def render(
    spec: ClipSpec, frames: int = 25, height: int = 64, width: int = 64, supersample: int = 4
) -> np.ndarray:
    """Render a clip as uint8 (frames, height, width, 3).

    Edges are anti-aliased by averaging ``supersample``² point samples per pixel, evaluated only inside
    the shape's box.
    """
    check_name(spec.shape, SHAPES, "shape")
    return render_inside(SHAPES[spec.shape], spec, frames, height, width, supersample)


def render_inside(
    inside: Callable[[np.ndarray, np.ndarray], np.ndarray],
    spec: ClipSpec,
    frames: int = 25,
    height: int = 64,
    width: int = 64,
    supersample: int = 4,
) -> np.ndarray:
    """``render`` with the shape given as an inside test in box coordinates (u, v in [-1, 1], v
    downwards) instead of ``spec.shape``, which is ignored: for shapes outside the table, such as the
    rounded blobs the judge must reject (tests/test_judge.py). uint8 (frames, height, width, 3)."""
    for name, table, kind in (
        (spec.color, COLORS, "color"),
        (spec.direction, DIRECTIONS, "direction"),
        (spec.background, BACKGROUNDS, "background"),
    ):
        check_name(name, table, kind)
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"render needs frames >= 1 and height, width >= 8, got {frames}x{height}x{width}")
    half = spec.size * min(height, width) / 2  # in pixels
    offsets = (np.arange(supersample) + 0.5) / supersample  # sample positions inside a pixel
    alpha = np.zeros((frames, height, width), dtype=np.float32)
    for f, (cx, cy) in enumerate(centers(spec, frames) * (width, height)):
        x0, x1 = max(int(math.floor(cx - half)), 0), min(int(math.ceil(cx + half)), width)
        y0, y1 = max(int(math.floor(cy - half)), 0), min(int(math.ceil(cy + half)), height)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = (np.arange(x0, x1)[:, None] + offsets).reshape(-1)
        ys = (np.arange(y0, y1)[:, None] + offsets).reshape(-1)
        hit = inside((xs[None, :] - cx) / half, (ys[:, None] - cy) / half)
        alpha[f, y0:y1, x0:x1] = hit.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    color = np.array(COLORS[spec.color], dtype=np.float32)
    video = background + alpha[..., None] * (color - background)
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def clips(
    seed: int,
    n: int,
    frames: int = 25,
    height: int = 64,
    width: int = 64,
    vocab: Vocab = DEFAULT_VOCAB,
    start: int = 0,
    allow_heldout: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(caption, video)`` for training clips ``start .. start + n - 1`` of dataset ``seed``.

    Videos are uint8 (frames, height, width, 3); clip i is the same whatever ``start`` and ``n`` are.
    ``allow_heldout`` draws from every composition: the caption is then the full one, held-out or not,
    and whoever trains on it must leave words out first (``train_dit.allowed_caption``).
    """
    for index in range(start, start + n):
        spec = spec_at(seed, index, vocab, allow_heldout)
        yield caption(spec), render(spec, frames, height, width)


def heldout_prompts(per_line: int = 4) -> list[str]:
    """Evaluation prompts covering every held-out composition, ``per_line`` prompts for each line.

    The words a line leaves open are filled in turn from the default vocabulary (all four directions for
    a colour-shape line, spread colours for a shape-direction line); every other prompt names the gray
    background. ``per_line`` is 1 to 4, as a colour-shape line has only four directions.
    """
    if not 1 <= per_line <= 4:
        raise ValueError(f"per_line must be 1 to 4 (one prompt per direction at most), got {per_line}")
    prompts = []
    for i, line in enumerate(HELDOUT):
        words = line.split()
        color = next((w for w in words if w in COLORS), None)
        shape = next(w for w in words if w in SHAPES)
        direction = next((w for w in words if w in DIRECTIONS), None)
        for k in range(per_line):
            c = color or DEFAULT_VOCAB.colors[(3 * k + i) % len(DEFAULT_VOCAB.colors)]
            d = direction or DEFAULT_VOCAB.directions[k % len(DEFAULT_VOCAB.directions)]
            text = f"a {c} {shape} moving {d}"
            prompts.append(text + (" on a gray background" if k % 2 else ""))
    return prompts


def eval_prompts(vocab: Vocab = DEFAULT_VOCAB, n: int | None = None) -> list[str]:
    """``n`` distinct training-distribution prompts (none held out), balanced over the vocabulary.

    Each prompt is the allowed composition whose colour, shape and direction have been used least so far
    (ties in a fixed shuffled order), so every value appears about equally often; by default
    ``n = 3 * max(#colours, #shapes, #directions)``. Every other prompt names the gray background.
    """
    allowed = [
        (c, s, d)
        for c in vocab.colors
        for s in vocab.shapes
        for d in vocab.directions
        if not is_heldout(f"a {c} {s} moving {d}")
    ]
    np.random.default_rng(0).shuffle(allowed)
    n = min(n or 3 * max(len(vocab.colors), len(vocab.shapes), len(vocab.directions)), len(allowed))
    used = dict.fromkeys(vocab.colors + vocab.shapes + vocab.directions, 0)
    prompts = []
    for i in range(n):
        pick = min(allowed, key=lambda combo: sum(used[w] for w in combo))
        allowed.remove(pick)
        for word in pick:
            used[word] += 1
        gray = i % 2 and "gray" in vocab.backgrounds
        prompts.append("a {} {} moving {}".format(*pick) + (" on a gray background" if gray else ""))
    return prompts


def spec_from_caption(text: str, rng: np.random.Generator) -> ClipSpec:
    """A random clip that matches ``text`` (held-out captions allowed): ground truth for evaluation."""
    fields = parse_caption(text)
    vocab = Vocab(
        colors=(str(fields["color"]),),
        shapes=(str(fields["shape"]),),
        directions=(str(fields["direction"]),),
        backgrounds=(str(fields["background"]),),
    )
    spec = sample_spec(rng, vocab, allow_heldout=True)
    return replace(spec, named_background=bool(fields["named_background"]))

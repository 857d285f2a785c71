import itertools
import math

import numpy as np
import pytest

from mochi.train import judge as J
from mochi.train import shapes as S


def _lossy(video: np.ndarray, sigma: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """A lossy reconstruction: separable Gaussian blur of ``sigma`` pixels, then Gaussian noise."""
    r = math.ceil(3 * sigma)
    kernel = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    v = np.pad(video.astype(np.float32), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = video.shape[1:3]
    v = sum(k * v[:, i : i + h] for i, k in enumerate(kernel))
    v = sum(k * v[:, :, i : i + w] for i, k in enumerate(kernel))
    v = v + rng.normal(0.0, noise, v.shape)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def _grid(seed: int):
    """One random clip for every colour, shape (star, wedge included), direction and background: 320."""
    rng = np.random.default_rng(seed)
    for combo in itertools.product(S.COLORS, S.SHAPES, S.DIRECTIONS, S.BACKGROUNDS):
        vocab = S.Vocab(*((name,) for name in combo))
        yield S.sample_spec(rng, vocab, allow_heldout=True)


def _accuracy(specs, distort=None) -> dict[str, float]:
    hits = {"color": 0, "shape": 0, "direction": 0, "background": 0}
    for spec in specs:
        video = S.render(spec)
        verdict = J.judge(distort(video) if distort else video)
        assert verdict.found
        for key in hits:
            hits[key] += getattr(verdict, key) == getattr(spec, key)
    return {key: value / len(specs) for key, value in hits.items()}


def test_judge_is_right_on_clean_renders():
    specs = list(_grid(seed=0))
    assert len(specs) == 320
    accuracy = _accuracy(specs)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_judge_survives_blur_and_noise():
    rng = np.random.default_rng(1)
    specs = list(_grid(seed=1))
    accuracy = _accuracy(specs, lambda v: _lossy(v, sigma=1.0, noise=6.0, rng=rng))
    assert min(accuracy.values()) >= 0.95, accuracy


def test_prototype_fill_ratios_and_moment_signatures():
    fill = {s: J._prototype(s)[0] for s in S.SHAPES}
    assert fill["circle"] == pytest.approx(math.pi / 4, abs=0.01)
    assert fill["square"] == pytest.approx(1.0, abs=0.01)
    assert fill["triangle"] == pytest.approx(0.5, abs=0.05)
    assert 0.3 < fill["star"] < 0.45
    moments = {s: np.array(J._prototype(s)[1:]) for s in S.SHAPES}
    # Each shape's symmetry shows in exactly its moment: c3 triangle, c4 square, c5 star; a circle has none.
    assert np.abs(moments["circle"]).max() < 1e-3
    assert abs(moments["square"][1]) > 0.015 and abs(moments["square"][[0, 2]]).max() < 1e-3
    assert abs(moments["triangle"][0]) > 0.06
    assert abs(moments["star"][2]) > 0.04 and abs(moments["star"][:2]).max() < 3e-3
    # The wedge is the triangle upside down: the same fill, c3 of the opposite sign.
    assert fill["wedge"] == pytest.approx(fill["triangle"], abs=0.01)
    assert moments["wedge"][0] == pytest.approx(-moments["triangle"][0], rel=0.05)


def test_verdict_measures_travel_and_straightness():
    spec = S.ClipSpec("orange", "triangle", "up", "gray", True, start=(0.5, 0.75), size=0.3, travel=0.45)
    verdict = J.judge(S.render(spec))
    assert (verdict.color, verdict.shape, verdict.direction, verdict.background) == (
        "orange",
        "triangle",
        "up",
        "gray",
    )
    assert verdict.travel == pytest.approx(0.45, abs=0.01)
    assert verdict.straightness > 0.99
    assert verdict.color_distance < 3


def test_known_background_and_candidate_restrictions():
    video = S.render(S.ClipSpec("purple", "star", "left", "gray", True, start=(0.7, 0.4), size=0.3))
    assert J.judge(video, background="gray").shape == "star"
    # Among circle, square and triangle a star is nearest one of them, and the strict judge sees it is none.
    assert J.judge(video, shapes=S.DEFAULT_VOCAB.shapes, strict=False).shape in S.DEFAULT_VOCAB.shapes
    assert J.judge(video, shapes=S.DEFAULT_VOCAB.shapes).shape == J.BLOB
    assert J.judge(video, palette={"a": (0, 0, 0), "b": (140, 70, 190)}).color == "b"
    with pytest.raises(ValueError, match="unknown background 'grey'.*did you mean 'gray'"):
        J.judge(video, background="grey")


def test_empty_video_is_not_found_and_a_still_object_has_no_direction():
    empty = np.full((25, 64, 64, 3), 15, np.uint8)
    assert not J.judge(empty).found
    assert J.score(["a green circle moving up"], [empty])["overall"]["color"] == 0.0
    still = S.render(S.ClipSpec("red", "circle", "up", start=(0.5, 0.5), size=0.3, travel=0.05))
    verdict = J.judge(still)
    assert verdict.found and verdict.direction == "still" and verdict.travel == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="uint8 video"):
        J.judge(np.zeros((25, 64, 64), np.uint8))


def test_score_counts_overall_and_heldout():
    rng = np.random.default_rng(4)
    prompts = ["a red circle moving right", "a blue circle moving up", "a green square moving down"]
    videos = [S.render(S.spec_from_caption(p, rng)) for p in prompts]
    videos[2] = S.render(S.spec_from_caption("a green square moving up", rng))  # wrong direction
    result = J.score(prompts, videos)
    assert result["overall"] == {"n": 3, "color": 1.0, "shape": 1.0, "direction": 2 / 3, "all": 2 / 3}
    assert result["heldout"] == {"n": 1, "color": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}
    assert J.score(prompts[:1], videos[:1])["heldout"] == {"n": 0}
    with pytest.raises(ValueError, match="one video per prompt"):
        J.score(prompts, videos[:2])


def test_psnr():
    a = np.full((2, 4, 4, 3), 100, np.uint8)
    assert J.psnr(a, a) == math.inf
    assert J.psnr(a, a + 1) == pytest.approx(20 * math.log10(255))
    assert J.psnr(a, a + 10) == pytest.approx(20 * math.log10(25.5))
    with pytest.raises(ValueError, match="same shape"):
        J.psnr(a, a[:1])


def _rounded_square(r: float):
    """A square whose corners are quarter circles of radius ``r`` half-sides (r = 1: a circle)."""

    def inside(u, v):
        a, b, c = np.abs(u), np.abs(v), 1 - r
        return (a <= 1) & (b <= 1) & ((a <= c) | (b <= c) | ((a - c) ** 2 + (b - c) ** 2 <= r * r))

    return inside


def _one_round_corner(u, v):
    """A square whose top right corner is a quarter circle of radius 1 half-side."""
    return (np.abs(u) <= 1) & (np.abs(v) <= 1) & ((u <= 0) | (v >= 0) | (u * u + v * v <= 1))


def _rounded_triangle(r: float):
    """The triangle shrunk and dilated by ``r`` half-sides: its three points rounded off."""
    triangle = S.SHAPES["triangle"]

    def inside(u, v):
        scale, hit = 1 - 1.6 * r, np.zeros(np.broadcast(u, v).shape, bool)
        for t in np.linspace(0, 2 * np.pi, 24, endpoint=False):
            hit |= triangle((u + r * np.cos(t)) / scale, (v + r * np.sin(t)) / scale)
        return hit

    return inside


BLOBS = {
    # name: (inside test, box size, what the moments-only judge called it)
    "square with corners rounded at 0.6": (_rounded_square(0.6), 0.40, "square"),
    "square with one corner rounded off": (_one_round_corner, 0.32, "square"),
    "triangle with rounded points": (_rounded_triangle(0.25), 0.32, "triangle"),
    "squircle |u|^3 + |v|^3 <= 1": (lambda u, v: np.abs(u) ** 3 + np.abs(v) ** 3 <= 1, 0.32, "circle"),
    "ellipse of aspect 0.8": (lambda u, v: (u / 0.8) ** 2 + v**2 <= 1, 0.32, "circle"),
    "egg": (lambda u, v: (u / (0.55 + 0.225 * (v + 1))) ** 2 + v**2 <= 1, 0.32, "circle"),
}


@pytest.mark.parametrize("name", list(BLOBS))
def test_strict_judge_calls_rounded_blobs_blobs(name):
    inside, size, before = BLOBS[name]
    spec = S.ClipSpec("white", "square", "right", "gray", True, start=(0.35, 0.5), size=size, travel=0.3)
    video = S.render_inside(inside, spec, frames=9)
    loose = J.judge(video, shapes=S.DEFAULT_VOCAB.shapes, strict=False)
    strict = J.judge(video, shapes=S.DEFAULT_VOCAB.shapes)
    assert loose.found and loose.shape == before
    assert strict.shape == J.BLOB and strict.nearest_shape == before and strict.outline_faults
    assert J.score(["a white " + before + " moving right"], [video])["overall"]["shape"] == 0.0


def test_strict_judge_keeps_a_square_with_barely_rounded_corners():
    spec = S.ClipSpec("red", "square", "up", start=(0.5, 0.7), size=0.32, travel=0.4)
    verdict = J.judge(S.render_inside(_rounded_square(0.3), spec))
    assert verdict.shape == "square" and not verdict.outline_faults


@pytest.mark.parametrize("shape", list(S.SHAPES))
def test_strict_judge_accepts_every_size_and_position(shape):
    """The smallest and largest object moving every way, from the extremes of where it may start (each
    corner of the allowed region and its middle, in turn), clean and blurred (σ = 1 pixel, noise 6 levels,
    about 27 dB)."""
    rng = np.random.default_rng(7)
    corners = itertools.cycle(((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)))
    for size in S.SIZE_RANGE:
        for direction, (dx, dy) in S.DIRECTIONS.items():
            for x, y in [next(corners)]:
                travel = S.TRAVEL_RANGE[0]
                lo_x, hi_x = size / 2 + max(-dx, 0) * travel, 1 - size / 2 - max(dx, 0) * travel
                lo_y, hi_y = size / 2 + max(-dy, 0) * travel, 1 - size / 2 - max(dy, 0) * travel
                start = (lo_x + x * (hi_x - lo_x), lo_y + y * (hi_y - lo_y))
                spec = S.ClipSpec("cyan", shape, direction, "gray", True, start, size, travel)
                video = S.render(spec)
                for v in (video, _lossy(video, sigma=1.0, noise=6.0, rng=rng)):
                    verdict = J.judge(v)
                    assert (verdict.shape, verdict.direction) == (shape, direction), (spec, verdict)


def test_outline_faults_name_the_rule():
    assert J.outline_faults("square", J._prototype_outline("square"), J._prototype("square")[1:]) == []
    faults = J.outline_faults("square", [0.75, 1.0, 0.5, 0.5, 0.5, 0.3], [0.0, -0.01, 0.0])
    assert faults == ["fill 0.75 < 0.8", "corners 0.45 < 0.68", "a corner 0.30 < 0.45"]
    assert J.outline_faults("circle", [0.78, 0.75, 0.3, 0.3, 0.3, 0.3], [0, 0, 0]) == [
        "aspect 0.75 outside [0.85, 1.18]"
    ]
    # A wedge is a triangle upside down: its empty corners are the bottom ones.
    wedge = J._prototype_outline("wedge")
    assert wedge[2] > 0.7 and wedge[4] < 0.05
    assert J.outline_faults("wedge", wedge, J._prototype("wedge")[1:]) == []
    assert J.outline_faults("triangle", wedge, J._prototype("wedge")[1:])[0].startswith("c3 ")


@pytest.mark.slow
def test_strict_judge_on_the_shipped_vae_round_trip():
    """The embedded model's VAE (v3: 34.85 dB, docs/embedded-model.md) rounds some objects: the strict
    judge accepts 22 of its 24 reconstructions of true clips, the moments-only judge all 24. The two the
    strict judge rejects as blobs are a red square and a green triangle, both on gray. (v2's VAE, 30.5 dB:
    21 and 23.)"""
    import torch

    from mochi.models.vae_tiling import decode, encode
    from mochi.train.train_vae import from_pixels, to_pixels
    from mochi.weights.bundle import load_embedded

    torch.manual_seed(0)
    components = load_embedded()
    rng = np.random.default_rng(5)
    hits = {"strict": 0, "loose": 0}
    specs = [
        S.sample_spec(rng, S.Vocab((c,), (s,), (d,), (b,)), allow_heldout=True)
        for (c, s), d, b in zip(
            itertools.product(S.DEFAULT_VOCAB.colors, S.DEFAULT_VOCAB.shapes),
            itertools.cycle(S.DIRECTIONS),
            itertools.cycle(S.BACKGROUNDS),
        )
    ]
    with torch.no_grad():
        for spec in specs:
            video = S.render(spec)
            mean, _ = encode(components.encoder, to_pixels(video[None]))
            decoded = from_pixels(decode(components.decoder, mean))[0]
            hits["strict"] += J.judge(decoded).shape == spec.shape
            hits["loose"] += J.judge(decoded, strict=False).shape == spec.shape
    assert hits == {"strict": 22, "loose": 24}

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
    assert J.judge(video, shapes=S.DEFAULT_VOCAB.shapes).shape in S.DEFAULT_VOCAB.shapes
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

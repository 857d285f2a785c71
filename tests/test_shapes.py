import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from mochi.train import shapes as S

HELDOUT_FILE = Path(__file__).resolve().parents[2] / "shared" / "heldout.txt"


def test_heldout_constant_matches_shared_file():
    path = HELDOUT_FILE if HELDOUT_FILE.exists() else Path("/work/shared/heldout.txt")
    if not path.exists():
        pytest.skip("no shared/heldout.txt here")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert list(S.HELDOUT) == lines


def test_tables_match_the_issue():
    assert S.COLORS["red"] == (220, 40, 40) and S.COLORS["cyan"] == (40, 200, 210) and len(S.COLORS) == 8
    assert S.BACKGROUNDS == {"black": (15, 15, 15), "gray": (100, 100, 100)}
    assert set(S.DIRECTIONS) == {"left", "right", "up", "down"}
    assert S.DEFAULT_VOCAB.shapes == ("circle", "square", "triangle")
    assert {"star", "wedge"} <= set(S.SHAPES) and set(S.FULL_VOCAB.shapes) == set(S.SHAPES)


def test_caption_round_trip_and_background_rule():
    rng = np.random.default_rng(0)
    named = set()
    for _ in range(300):
        spec = S.sample_spec(rng, S.FULL_VOCAB)
        text = S.caption(spec)
        fields = S.parse_caption(text)
        assert fields == {
            "color": spec.color,
            "shape": spec.shape,
            "direction": spec.direction,
            "background": spec.background,
            "named_background": spec.named_background,
        }
        # Only black may go unnamed, since an unnamed background means black.
        assert spec.named_background or spec.background == "black"
        named.add((spec.background, spec.named_background))
    assert named == {("black", False), ("black", True), ("gray", True)}
    assert S.caption(S.ClipSpec("red", "circle", "right")) == "a red circle moving right"
    assert S.parse_caption("A red star moving up on a gray background.")["shape"] == "star"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a redd circle moving right", "unknown color 'redd'.*did you mean 'red'"),
        ("a red circel moving right", "unknown shape 'circel'.*did you mean 'circle'"),
        ("a red circle moving rigth", "unknown direction 'rigth'.*did you mean 'right'"),
        ("a red circle moving right on a grey background", "unknown background 'grey'.*did you mean 'gray'"),
        ("red circle moving right", "does not follow the grammar"),
        ("a red circle moving right on the gray background", "does not follow the grammar"),
    ],
)
def test_parse_caption_errors_name_the_nearest_choice(text, message):
    with pytest.raises(ValueError, match=message):
        S.parse_caption(text)


def test_vocab_rejects_unknown_and_empty_names():
    with pytest.raises(ValueError, match="unknown shape 'stars'.*did you mean 'star'"):
        S.Vocab(("red",), ("stars",), ("up",), ("black",))
    with pytest.raises(ValueError, match="Vocab.colors is empty"):
        S.Vocab((), ("star",), ("up",), ("black",))


def test_heldout_is_a_whole_word_match():
    assert S.heldout_lines("a red triangle moving up") == {"red triangle", "triangle moving up"}
    assert S.is_heldout("a green circle moving left on a gray background")
    assert not S.is_heldout("a red square moving up")
    assert not S.is_heldout("a reddish triangles moving upward")  # substrings are not words


def test_training_sampler_never_draws_a_heldout_composition_and_misses_nothing_else():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(4000):
        spec = S.sample_spec(rng)
        text = S.caption(spec)
        words = set(text.split())
        assert not any(set(line.split()) <= words for line in S.HELDOUT), text
        seen.add((spec.color, spec.shape, spec.direction))
    # 8 colours x 3 shapes x 4 directions = 96, of which the held-out lines remove 5 x 4 colour-shape
    # compositions, 6 more triangles moving up and 7 more circles moving left.
    assert len(seen) == 96 - 20 - 6 - 7


def test_sampler_raises_when_everything_is_held_out():
    with pytest.raises(ValueError, match="held out"):
        S.sample_spec(np.random.default_rng(0), S.Vocab(("red",), ("triangle",), ("up",), ("black",)))


def test_sampled_motion_stays_in_frame_and_travels_a_third():
    rng = np.random.default_rng(2)
    for _ in range(2000):
        spec = S.sample_spec(rng, S.FULL_VOCAB)
        path = S.centers(spec, 25)
        assert path.min() >= spec.size / 2 - 1e-9 and path.max() <= 1 - spec.size / 2 + 1e-9
        assert spec.travel >= 1 / 3
        moved = path[-1] - path[0]
        assert np.allclose(moved, np.array(S.DIRECTIONS[spec.direction]) * spec.travel)


def test_render_colours_area_and_anti_aliasing():
    spec = S.ClipSpec("blue", "square", "right", "gray", True, start=(0.3, 0.5), size=0.3, travel=0.4)
    video = S.render(spec, frames=9, height=64, width=64)
    assert video.shape == (9, 64, 64, 3) and video.dtype == np.uint8
    assert (video[:, 0, 0] == S.BACKGROUNDS["gray"]).all()
    assert (video[0, 32, int(0.3 * 64)] == S.COLORS["blue"]).all()
    blue, gray = np.array(S.COLORS["blue"]), np.array(S.BACKGROUNDS["gray"])
    coverage = (video[..., 2].astype(float) - gray[2]) / (blue[2] - gray[2])
    side = 0.3 * 64
    # 4x4 supersampling places an edge to within 1/8 pixel; a missing row or column would be 5% off.
    assert np.allclose(coverage.sum(axis=(1, 2)), side * side, rtol=0.025)
    partial = (coverage > 0.02) & (coverage < 0.98)
    assert partial.sum() > 9 * 8  # the moving edges fall between pixels
    circle = S.render(S.ClipSpec("white", "circle", "up", size=0.4), frames=1)
    cover = (circle[0, ..., 0].astype(float) - 15) / (240 - 15)
    assert cover.sum() == pytest.approx(math.pi * (0.2 * 64) ** 2, rel=0.01)


def test_star_is_upright_with_five_points():
    video = S.render(S.ClipSpec("white", "star", "right", start=(0.5, 0.5), size=0.6, travel=0.4), frames=1)
    mask = video[0, ..., 0] > 128
    rows = np.nonzero(mask.any(axis=1))[0]
    top = np.nonzero(mask[rows[0]])[0]
    assert abs(top.mean() - 31.5) <= 1  # a single point on the axis at the top
    bottom = mask[rows[-1] - 1]
    assert not bottom[31:33].any() and bottom[:31].any() and bottom[33:].any()  # two legs at the bottom
    assert np.array_equal(mask, mask[:, ::-1])  # left-right symmetric about the centre


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        S.render(S.ClipSpec("teal", "circle", "up"))
    with pytest.raises(ValueError, match="height, width >= 8"):
        S.render(S.ClipSpec("red", "circle", "up"), height=4)


def test_clips_are_deterministic_and_randomly_accessible():
    first = list(S.clips(seed=7, n=4, frames=5, height=32, width=32))
    again = list(S.clips(seed=7, n=4, frames=5, height=32, width=32))
    tail = list(S.clips(seed=7, n=2, frames=5, height=32, width=32, start=2))
    other = list(S.clips(seed=8, n=4, frames=5, height=32, width=32))
    for (c1, v1), (c2, v2) in zip(first, again):
        assert c1 == c2 and np.array_equal(v1, v2)
    for (c1, v1), (c2, v2) in zip(first[2:], tail):
        assert c1 == c2 and np.array_equal(v1, v2)
    assert any(not np.array_equal(v1, v2) for (_, v1), (_, v2) in zip(first, other))
    assert all(v.shape == (5, 32, 32, 3) for _, v in first)


def test_heldout_prompts_cover_every_line():
    prompts = S.heldout_prompts(per_line=4)
    assert len(prompts) == 4 * len(S.HELDOUT) and len(set(prompts)) == len(prompts)
    for line in S.HELDOUT:
        hits = [p for p in prompts if line in S.heldout_lines(p)]
        assert len(hits) >= 4
    for prompt in prompts:
        fields = S.parse_caption(prompt)
        assert fields["shape"] in S.DEFAULT_VOCAB.shapes
    directions = {S.parse_caption(p)["direction"] for p in prompts if "red triangle" in S.heldout_lines(p)}
    assert directions == set(S.DIRECTIONS)
    assert len(S.heldout_prompts(per_line=1)) == len(S.HELDOUT)
    with pytest.raises(ValueError, match="per_line must be 1 to 4"):
        S.heldout_prompts(per_line=5)


@pytest.mark.parametrize("vocab", [S.DEFAULT_VOCAB, S.FULL_VOCAB])
def test_eval_prompts_are_training_compositions_covering_the_vocabulary(vocab):
    prompts = S.eval_prompts(vocab)
    assert len(prompts) == 3 * max(len(vocab.colors), len(vocab.shapes), len(vocab.directions))
    assert len(set(prompts)) == len(prompts)
    assert not any(S.is_heldout(p) for p in prompts)
    fields = [S.parse_caption(p) for p in prompts]
    for key, names in (("color", vocab.colors), ("shape", vocab.shapes), ("direction", vocab.directions)):
        assert {f[key] for f in fields} == set(names)
    assert {f["background"] for f in fields} == {"black", "gray"}


def test_spec_from_caption_follows_the_caption():
    rng = np.random.default_rng(3)
    for text in itertools.islice(S.heldout_prompts(), 0, None, 5):
        spec = S.spec_from_caption(text, rng)
        assert S.caption(spec) == text

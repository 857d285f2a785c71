"""The adherence benchmark's helpers (mochi.train.evaluate) on the tiny random components."""

from __future__ import annotations

import numpy as np
import torch

from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.train.evaluate import color_drift, frame_strip, generate, reconstruction_psnr, reconstructions

from .test_pipeline import tiny_components

PROMPTS = ["a red circle moving right", "a blue square moving up on a gray background"]


def test_generate_matches_the_pipeline():
    components = tiny_components()
    videos = generate(components, PROMPTS, seed=5)
    assert videos.shape == (2, 7, 32, 32, 3) and videos.dtype == np.uint8
    # Prompt i uses noise seed 5 + i and the pipeline's sampler, guidance and decode.
    pipe = MochiPipeline(components, device="cpu")
    for i, prompt in enumerate(PROMPTS):
        frames = pipe.generate(GenerationRequest(prompt, seed=5 + i)).frames.numpy()[0]
        assert np.abs(frames.astype(int) - videos[i].astype(int)).max() <= 1


def test_generate_follows_the_models_sampler_as_the_pipeline_does():
    """benchmarks/adherence.py measures what `mochi generate` makes: the defaults' eta, unless told."""
    components = tiny_components()
    components.defaults = {**components.defaults, "eta": 1.0, "eta_above": 0.3}
    videos = generate(components, PROMPTS[:1], seed=5)
    assert np.array_equal(videos, generate(components, PROMPTS[:1], seed=5, eta=1.0, eta_above=0.3))
    assert not np.array_equal(videos, generate(components, PROMPTS[:1], seed=5, eta=0.0))
    frames = MochiPipeline(components, device="cpu").generate(GenerationRequest(PROMPTS[0], seed=5)).frames
    assert np.abs(frames.numpy()[0].astype(int) - videos[0].astype(int)).max() <= 1


def test_reconstructions_and_psnr_have_the_models_size():
    components = tiny_components()
    videos = reconstructions(components, PROMPTS, seed=1)
    assert videos.shape == (2, 7, 32, 32, 3) and videos.dtype == np.uint8
    assert np.array_equal(videos, reconstructions(components, PROMPTS, seed=1))
    values = reconstruction_psnr(components, n=2, frames=7)
    assert len(values) == 2 and all(0 < v < 60 for v in values)


def test_frame_strip_lays_out_first_middle_last():
    videos = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 6, 3), dtype=np.uint8)
    strip = frame_strip(videos, gap=1)
    assert strip.shape == (2 * 4 + 1, 3 * 6 + 2, 3)
    assert np.array_equal(strip[5:9, 14:20], videos[1, 4])  # row 2, column 3: last frame of video 2
    assert np.array_equal(strip[0:4, 7:13], videos[0, 2]) and (strip[4] == 255).all()


def test_color_drift_is_the_decoded_objects_colour_minus_the_palette(monkeypatch):
    """With an encoder that passes pixels through and a decoder that adds a fixed offset, the drift of
    every clip is exactly that offset, in levels: the measure reads the object's fully covered pixels."""
    from mochi.train import evaluate, shapes

    offset = torch.tensor([12.0, -25.0, 3.0]) / 127.5
    monkeypatch.setattr(evaluate, "encode", lambda encoder, x: (x, None))
    monkeypatch.setattr(evaluate, "decode", lambda decoder, z: z + offset.view(1, 3, 1, 1, 1))
    drifts = color_drift(tiny_components(), n=3, frames=7)
    assert [name for name, _ in drifts] == [shapes.spec_at(12345, i).color for i in range(3)]
    for name, drift in drifts:
        expected = np.clip(np.array(shapes.COLORS[name]) + [12, -25, 3], 0, 255) - shapes.COLORS[name]
        assert np.allclose(drift, expected, atol=0.51), (name, drift)


def test_video_to_video_benchmark_runs_and_asks_for_another_colour(capsys):
    import importlib.util
    from pathlib import Path

    from mochi.train import shapes

    path = Path(__file__).parents[1] / "benchmarks" / "video_to_video.py"
    spec = importlib.util.spec_from_file_location("video_to_video", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for i in range(12):
        clip = shapes.spec_at(777, i)
        target = bench.recolored(clip, i)
        assert target.color != clip.color and target.color in shapes.DEFAULT_VOCAB.colors
        assert (target.shape, target.direction, target.start) == (clip.shape, clip.direction, clip.start)
    bench.main(["--clips", "2", "--strength", "0.9"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 0.9 |")]
    assert len(rows) == 2 and "| 0.9 | euler |" in rows[0] and "model's (eta 1 above 0.3)" in rows[1]
    assert "4 videos (25x64x64)" in out

"""The adherence benchmark's helpers (mochi.train.evaluate) on the tiny random components."""

from __future__ import annotations

import numpy as np

from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.train.evaluate import frame_strip, generate, reconstruction_psnr, reconstructions

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

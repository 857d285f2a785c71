"""Previews while sampling: the sampler's denoised estimate, the 12 → 3 maps, the PNG writer, the fit."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")

from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.request import GenerationRequest  # noqa: E402
from mochi.serve import preview  # noqa: E402

from .test_pipeline import tiny_components  # noqa: E402


def read_png(data: bytes) -> np.ndarray:
    """Decode the PNGs ``encode_png`` writes (8-bit RGB, filter 0) with the standard library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    w, h, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    rows = zlib.decompress(chunks[b"IDAT"])
    assert len(rows) == h * (1 + 3 * w) and all(rows[y * (1 + 3 * w)] == 0 for y in range(h))
    return np.frombuffer(rows, dtype=np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)


def test_png_round_trip_is_exact():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(read_png(preview.encode_png(image)), image)


def test_denoised_hook_gives_x0_and_leaves_the_result_unchanged():
    pipe = MochiPipeline(tiny_components(), device="cpu")
    request = GenerationRequest("a red circle moving right", seed=5, steps=4)
    seen = []
    with_hook = pipe.generate(
        request, denoised=lambda step, total, x0: seen.append((step, total, x0.clone()))
    )
    plain = pipe.generate(request)
    assert torch.equal(with_hook.latents, plain.latents) and torch.equal(with_hook.frames, plain.frames)
    assert [(s, t) for s, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert seen[0][2].shape == (1, 12, 2, 4, 4)
    # At the last step σ_next = 0, so the Euler step lands on the estimate itself.
    torch.testing.assert_close(seen[-1][2], plain.latents, rtol=0, atol=1e-6)
    assert (seen[0][2] - plain.latents).abs().mean() > 1e-3  # the early estimates differ


def test_preview_image_maps_every_latent_pixel_and_picks_frames():
    rgb_map = preview.load_map(preview.RELEASED)
    x0 = torch.randn(2, 12, 7, 3, 5, generator=torch.Generator().manual_seed(1))
    strip = preview.preview_image(x0, rgb_map)
    assert strip.shape == (3, 4 * 5 + 3, 3) and strip.dtype == np.uint8
    w, b = torch.tensor(rgb_map.weight), torch.tensor(rgb_map.bias)
    for slot, frame in enumerate([0, 2, 4, 6]):  # the first, last and two evenly between
        expected = torch.einsum("chw,cr->hwr", x0[0, :, frame], w) + b
        expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(strip[:, slot * 6 : slot * 6 + 5], expected)
    assert (strip[:, 5] == 24).all()  # the gap between frames
    assert preview.preview_image(x0[:, :, :1], rgb_map).shape == (3, 5, 3)


def test_the_two_shipped_maps_and_which_model_gets_which():
    released = preview.load_map("mochi-1-preview")
    assert "ComfyUI" in released.source and "class Mochi" in released.source
    assert released.weight[7] == (0.5294, 0.5204, 0.3852) and released.bias == (-0.094, -0.1418, -0.1453)
    tiny = preview.load_map("mochi-tiny")
    assert "least squares" in tiny.source and len(tiny.weight) == 12

    class Released:
        name, latent_mean = "mochi-1-preview", None

    class Embedded:
        name, latent_mean = "mochi-tiny", (0.0,) * 12

    class Other:
        name, latent_mean = "my-bundle", (0.0,) * 12

    assert preview.map_for(Released()) == released
    assert preview.map_for(Embedded()) == tiny
    assert preview.map_for(Other()) == released  # no factors of its own: the released model's


def test_fit_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 3, generator=g) * 0.05  # small enough that the clamp never bites
    bias = torch.tensor([0.1, -0.2, 0.05])
    latents, frames = [], []
    for _ in range(3):
        z = torch.randn(12, 3, 4, 5, generator=g)
        rgb = (torch.einsum("cthw,cr->thwr", z, weight) + bias).clamp(-1, 1)
        # Each latent pixel becomes a flat 8×8 patch, latent frame 0 one frame and every other six frames.
        video = rgb.repeat_interleave(8, 1).repeat_interleave(8, 2)
        video = torch.cat([video[:1], video[1:].repeat_interleave(6, 0)])
        frames.append(((video + 1) * 127.5).round().to(torch.uint8))
        latents.append(z)
    fitted_w, fitted_b, rmse = preview.fit_factors(latents, frames)
    assert fitted_w.shape == (12, 3) and fitted_b.shape == (3,)
    assert rmse < 0.01  # only the uint8 rounding is unexplained
    np.testing.assert_allclose(fitted_w, weight.numpy(), atol=0.01)
    np.testing.assert_allclose(fitted_b, bias.numpy(), atol=0.01)


def test_patch_targets_follow_the_causal_time_grouping():
    frames = torch.zeros(13, 16, 16, 3, dtype=torch.uint8)
    frames[0] = 255  # frame 0 alone is latent frame 0
    frames[7:13, :8, :8] = 255  # frames 7-12 are latent frame 2
    targets = preview.patch_targets(frames, 3, 2, 2)
    assert targets.shape == (3, 2, 2, 3)
    assert (targets[0] == 1).all() and (targets[1] == -1).all()
    assert (targets[2, 0, 0] == 1).all() and (targets[2, 1, 1] == -1).all()

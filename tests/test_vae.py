"""AsymmVAE: Genmo key sets, frame rule, causality, exact temporal chunking, tiling, latent statistics."""

import pytest
import torch

from mochi.models.latents import LATENT_MEAN, LATENT_STD, dit_to_vae, vae_to_dit
from mochi.models.vae import (
    DECODER_PRESETS,
    ENCODER_PRESETS,
    Decoder,
    Encoder,
    check_frame_size,
    num_frames_for_latents,
    num_latents_for_frames,
)
from mochi.models.vae_memory import estimate_decode_memory
from mochi.models.vae_tiling import _ramps, decode, encode, plan_decode, tile_layout


def _rb(prefix: str, c: int, attention: bool = False) -> dict[str, tuple[int, ...]]:
    """One Genmo ResBlock's tensors (genmo-mochi.md §2.1, §2.3)."""
    out = {}
    for i in (0, 3):
        out[f"{prefix}.stack.{i}.weight"] = (c,)
        out[f"{prefix}.stack.{i}.bias"] = (c,)
    for i in (2, 5):
        out[f"{prefix}.stack.{i}.weight"] = (c, c, 3, 3, 3)
        out[f"{prefix}.stack.{i}.bias"] = (c,)
    if attention:
        out[f"{prefix}.attn_block.norm.weight"] = (c,)
        out[f"{prefix}.attn_block.norm.bias"] = (c,)
        out[f"{prefix}.attn_block.attn.qkv.weight"] = (3 * c, c)
        out[f"{prefix}.attn_block.attn.out.weight"] = (c, c)
        out[f"{prefix}.attn_block.attn.out.bias"] = (c,)
    return out


def released_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """The table of genmo-mochi.md §2.2, written out independently of our model."""
    sd = {"blocks.0.0.weight": (768, 12, 1, 1, 1), "blocks.0.0.bias": (768,)}
    for i in (1, 2, 3):
        sd |= _rb(f"blocks.0.{i}", 768)
    for b, (c, n, proj) in enumerate([(768, 6, 6144), (512, 4, 2048), (256, 3, 512)], start=1):
        for i in range(n):
            sd |= _rb(f"blocks.{b}.blocks.{i}", c)
        sd[f"blocks.{b}.proj.weight"] = (proj, c)
        sd[f"blocks.{b}.proj.bias"] = (proj,)
    for i in range(3):
        sd |= _rb(f"blocks.4.{i}", 128)
    sd["output_proj.weight"] = (3, 128)
    sd["output_proj.bias"] = (3,)
    return sd


def released_encoder_shapes() -> dict[str, tuple[int, ...]]:
    """The table of genmo-mochi.md §2.3, written out independently of our model."""
    sd = {"layers.0.weight": (64, 15), "layers.0.bias": (64,)}
    for i in (1, 2, 3):
        sd |= _rb(f"layers.{i}", 64)
    for layer, (cin, cout, te, n) in zip((4, 5, 6), [(64, 128, 1, 3), (128, 256, 2, 4), (256, 384, 3, 6)]):
        sd[f"layers.{layer}.layers.0.weight"] = (cout, cin, te, 2, 2)
        sd[f"layers.{layer}.layers.0.bias"] = (cout,)
        for i in range(1, n + 1):
            sd |= _rb(f"layers.{layer}.layers.{i}", cout, attention=True)
    for i in (7, 8, 9):
        sd |= _rb(f"layers.{i}", 384, attention=True)
    sd |= {"output_norm.weight": (384,), "output_norm.bias": (384,), "output_proj.weight": (24, 384)}
    return sd


def _numel(shapes):
    total = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        total += n
    return total


@pytest.mark.parametrize(
    ("build", "preset", "expected", "n_keys", "n_params"),
    [
        (Decoder, DECODER_PRESETS, released_decoder_shapes, 162, 362_526_595),
        (Encoder, ENCODER_PRESETS, released_encoder_shapes, 243, 97_222_016),
    ],
)
def test_released_key_sets(build, preset, expected, n_keys, n_params):
    with torch.device("meta"):
        model = build(preset["mochi-1-preview"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected()
    assert len(want) == n_keys and _numel(want) == n_params
    assert shapes == want
    assert sum(p.numel() for p in model.parameters()) == n_params


def tiny(seed: int = 0) -> tuple[Decoder, Encoder]:
    """Tiny decoder and encoder with every weight perturbed (so norms and biases matter)."""
    torch.manual_seed(seed)
    dec, enc = Decoder(DECODER_PRESETS["tiny"]).eval(), Encoder(ENCODER_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in [*dec.parameters(), *enc.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return dec, enc


@pytest.fixture(scope="module")
def models():
    return tiny()


def test_frame_rule_numbers():
    assert [num_frames_for_latents(t) for t in (1, 2, 28)] == [1, 7, 163]
    assert [num_latents_for_frames(f) for f in (1, 7, 163)] == [1, 2, 28]
    with pytest.raises(ValueError, match="20.*6k\\+1.*nearest: 19 or 25"):
        num_latents_for_frames(20)
    with pytest.raises(ValueError, match="nearest: 1 or 7"):
        num_latents_for_frames(0)
    with pytest.raises(ValueError, match="latent frame count 0"):
        num_frames_for_latents(0)
    with pytest.raises(ValueError, match="height 30 .*multiple of 8; nearest: 24 or 32"):
        check_frame_size(30, 48)
    with pytest.raises(ValueError, match="width 50 .*nearest: 48 or 56"):
        check_frame_size(32, 50)


def test_shapes_and_frame_rule(models):
    dec, enc = models
    z = torch.randn(2, 12, 3, 2, 3)
    assert decode(dec, z).shape == (2, 3, 13, 16, 24)
    mean, logvar = encode(enc, torch.rand(2, 3, 13, 16, 24) * 2 - 1)
    assert mean.shape == logvar.shape == (2, 12, 3, 2, 3)
    with pytest.raises(ValueError, match="frame count 12 .*nearest: 7 or 13"):
        encode(enc, torch.zeros(1, 3, 12, 16, 16))
    with pytest.raises(ValueError, match="height 20 .*nearest: 16 or 24"):
        encode(enc, torch.zeros(1, 3, 7, 20, 16))
    with pytest.raises(ValueError, match="expected \\(B, 12, t, h, w\\)"):
        decode(dec, torch.zeros(1, 4, 2, 2, 2))


def test_causality(models):
    dec, enc = models
    x = torch.rand(1, 3, 19, 16, 24) * 2 - 1
    full_mean, _ = encode(enc, x)
    first, _ = encode(enc, x[:, :, :1])
    torch.testing.assert_close(first, full_mean[:, :, :1], rtol=0, atol=1e-5)
    prefix, _ = encode(enc, x[:, :, :7])
    torch.testing.assert_close(prefix, full_mean[:, :, :2], rtol=0, atol=1e-5)
    z = torch.randn(1, 12, 4, 2, 3)
    frames = decode(dec, z)
    torch.testing.assert_close(decode(dec, z[:, :, :2]), frames[:, :, :7], rtol=0, atol=1e-5)
    torch.testing.assert_close(decode(dec, z[:, :, :1]), frames[:, :, :1], rtol=0, atol=1e-5)
    # And the future matters: changing the last latent changes only the last six frames.
    z2 = z.clone()
    z2[:, :, -1] += 1
    changed = (decode(dec, z2) - frames).abs().amax(dim=(0, 1, 3, 4)) > 1e-4
    assert changed.tolist() == [False] * 13 + [True] * 6


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_decode_is_exact(models, chunk):
    dec, _ = models
    z = torch.randn(1, 12, 5, 3, 4)
    full = decode(dec, z)
    assert (decode(dec, z, chunk=chunk) - full).abs().max() <= 1e-5
    tiled = decode(dec, z, tile=(2, 3), overlap=1)
    assert (decode(dec, z, tile=(2, 3), overlap=1, chunk=chunk) - tiled).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encode_is_exact(models, chunk):
    _, enc = models
    x = torch.rand(1, 3, 19, 24, 32) * 2 - 1
    mean, logvar = encode(enc, x)
    mean_c, logvar_c = encode(enc, x, chunk=chunk)
    assert (mean_c - mean).abs().max() <= 1e-5
    assert (logvar_c - logvar).abs().max() <= 1e-5


def test_blend_weights_are_a_partition_of_unity():
    for size, tile, overlap in [(60, 32, 4), (106, 32, 8), (13, 5, 2), (7, 7, 2)]:
        starts, length = tile_layout(size, tile, overlap)
        assert length <= tile and starts[0] == 0 and starts[-1] + length == size
        assert len(starts) == (1 if tile >= size else -(-(size - overlap) // (tile - overlap)))
        tile = length
        assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))
        total = torch.zeros(size * 8)
        for s, w in zip(starts, _ramps(starts, tile, size, 8)):
            assert w.min() > 0
            total[s * 8 : s * 8 + w.numel()] += w
        torch.testing.assert_close(total, torch.ones(size * 8))


class TileMeanDecoder(Decoder):
    """A stand-in decoder whose output depends on the tile it sees, as GroupNorm statistics make the real
    one do: nearest-upsampled latent channel 0 plus the tile's mean. Tiling shows as a jump at each seam
    unless the tiles are blended."""

    def forward(self, z, ctx=None):
        x = z[:, :3].repeat_interleave(6, dim=2)
        x = x if ctx is not None and ctx.started else x[:, :, 5:]
        x = x.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        if ctx is not None:
            ctx.started = True
        return x + z.mean()


def test_tiles_blend_without_seams():
    dec = TileMeanDecoder(DECODER_PRESETS["tiny"])
    ramp = torch.linspace(0, 4, 16).view(1, 1, 1, 1, 16).expand(1, 12, 2, 4, 16)
    full = decode(dec, ramp) - ramp.mean()  # the untiled output without its (global) tile mean

    def worst_step(v):
        return (v[..., 1:] - v[..., :-1]).abs().max().item()

    hard = decode(dec, ramp, tile=(4, 8), overlap=0)
    blended = decode(dec, ramp, tile=(4, 8), overlap=3)
    assert worst_step(full) == pytest.approx(4 / 15, rel=1e-5)
    assert worst_step(hard) > 3 * worst_step(full)  # a visible seam
    assert worst_step(blended) < 1.5 * worst_step(full)  # no seam
    torch.testing.assert_close(decode(dec, ramp, tile=(4, 16), overlap=3), full + ramp.mean())


def test_a_cpu_batch_of_videos_is_estimated_with_onednn_not_the_column_buffer(models):
    """PyTorch runs a small fp32 conv of one sample with its own kernel (a column buffer 27 times the
    output), but any batch above 1 with oneDNN: the CPU estimate of a 2-video decode or encode counted the
    column buffer for it (5 times the estimate here), so a --max-memory that fits could be refused."""
    from torch.profiler import profile

    from mochi.models.vae_memory import estimate_encode_memory

    dec, enc = models
    with profile() as run:  # the premise, at the tiny decoder's width
        torch.nn.functional.conv3d(torch.randn(2, 8, 4, 6, 6), torch.randn(8, 8, 3, 3, 3))
    assert "aten::mkldnn_convolution" in {e.name for e in run.events()}
    one, two = (1, 2, 4, 4), (2, 2, 4, 4)
    assert estimate_decode_memory(dec.cfg, one, (4, 4), 1, cpu=True) > estimate_decode_memory(
        dec.cfg, one, (4, 4), 1
    )
    assert estimate_decode_memory(dec.cfg, two, (4, 4), 1, cpu=True) == estimate_decode_memory(
        dec.cfg, two, (4, 4), 1
    )
    assert estimate_encode_memory(enc.cfg, two, (4, 4), 1, cpu=True) == estimate_encode_memory(
        enc.cfg, two, (4, 4), 1
    )


def test_max_memory_chooses_a_split(models):
    dec, _ = models
    shape = (1, 6, 8, 12)

    def est(tile, chunk):  # the CPU's estimate, as the planner makes for a decoder on the CPU
        return estimate_decode_memory(dec.cfg, shape, tile, chunk, cpu=True)

    whole = est((8, 12), 6)
    assert plan_decode(dec, shape, whole).tile == (8, 12) and plan_decode(dec, shape, whole).chunk == 6
    small = plan_decode(dec, shape, whole // 2)
    assert est(small.tile, small.chunk) <= whole // 2
    assert small.chunk < 6 or small.tile != (8, 12)
    with pytest.raises(ValueError, match="max_memory 1000 bytes is too small.*needs about"):
        plan_decode(dec, shape, 1000)
    fixed = plan_decode(dec, shape, whole // 2, tile=(4, 6), overlap=2)
    assert fixed.tile == (4, 6) and fixed.overlap == 2
    assert est((4, 6), fixed.chunk) <= whole // 2
    assert fixed.chunk == 6 or est((4, 6), fixed.chunk + 1) > whole // 2
    with pytest.raises(ValueError, match="tile height 2 is invalid.*larger than the overlap"):
        plan_decode(dec, shape, whole, tile=2, overlap=2)
    z = torch.randn(1, 12, 6, 8, 12)
    out = decode(dec, z, max_memory=whole // 2)
    assert out.shape == (1, 3, 31, 64, 96)


def test_latent_normalisation():
    z = torch.randn(1, 12, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(dit_to_vae(vae_to_dit(z)), z)
    zero = dit_to_vae(torch.zeros(1, 12, 1, 1, 1))
    assert zero.flatten().tolist() == pytest.approx(LATENT_MEAN, abs=1e-7)
    one = dit_to_vae(torch.ones(1, 12, 1, 1, 1)) - zero
    assert one.flatten().tolist() == pytest.approx(LATENT_STD, abs=1e-6)
    assert vae_to_dit(torch.zeros(1, 12, 1, 1, 1, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected \\(B, 12, t, h, w\\)"):
        vae_to_dit(torch.zeros(1, 4, 1, 1, 1))


def test_bfloat16_runs_close_to_float32(models):
    dec, enc = models
    z = torch.randn(1, 12, 2, 2, 3)
    x = torch.rand(1, 3, 7, 16, 24) * 2 - 1
    ref_frames, (ref_mean, _) = decode(dec, z), encode(enc, x)
    dec16 = Decoder(dec.cfg).to(torch.bfloat16).eval()
    dec16.load_state_dict(dec.state_dict())
    enc16 = Encoder(enc.cfg).to(torch.bfloat16).eval()
    enc16.load_state_dict(enc.state_dict())
    frames, (mean, _) = decode(dec16, z, chunk=1), encode(enc16, x, chunk=1)
    assert frames.dtype == mean.dtype == torch.float32
    assert (frames - ref_frames).abs().mean() < 0.02 * ref_frames.abs().mean() + 1e-3
    assert (mean - ref_mean).abs().mean() < 0.05 * ref_mean.abs().mean() + 1e-3

"""AsymmDiT: the released key set, batching = separate calls, dtypes and fp32 islands, input errors."""

import math

import pytest
import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT, DiTConfig
from mochi.ops.attention import attention, available_backends, check_backend
from mochi.ops.rope import rope_positions

TINY = DIT_PRESETS["tiny"]


def released_shapes() -> dict[str, tuple[int, ...]]:
    """genmo-mochi.md §1.2, written out from the reference tables (not from the model)."""
    shapes = {
        "x_embedder.proj.weight": (3072, 12, 2, 2),
        "x_embedder.proj.bias": (3072,),
        "t_embedder.mlp.0.weight": (3072, 256),
        "t_embedder.mlp.0.bias": (3072,),
        "t_embedder.mlp.2.weight": (3072, 3072),
        "t_embedder.mlp.2.bias": (3072,),
        "t5_y_embedder.to_kv.weight": (8192, 4096),
        "t5_y_embedder.to_kv.bias": (8192,),
        "t5_y_embedder.to_q.weight": (4096, 4096),
        "t5_y_embedder.to_q.bias": (4096,),
        "t5_y_embedder.to_out.weight": (3072, 4096),
        "t5_y_embedder.to_out.bias": (3072,),
        "t5_yproj.weight": (1536, 4096),
        "t5_yproj.bias": (1536,),
        "pos_frequencies": (3, 24, 64),
        "final_layer.mod.weight": (6144, 3072),
        "final_layer.mod.bias": (6144,),
        "final_layer.linear.weight": (48, 3072),
        "final_layer.linear.bias": (48,),
    }
    for i in range(48):
        last = i == 47
        block = {
            "mod_x.weight": (12288, 3072),
            "mod_x.bias": (12288,),
            "mod_y.weight": (1536 if last else 6144, 3072),
            "mod_y.bias": (1536 if last else 6144,),
            "attn.qkv_x.weight": (9216, 3072),
            "attn.qkv_y.weight": (9216, 1536),
            "attn.q_norm_x.weight": (128,),
            "attn.k_norm_x.weight": (128,),
            "attn.q_norm_y.weight": (128,),
            "attn.k_norm_y.weight": (128,),
            "attn.proj_x.weight": (3072, 3072),
            "attn.proj_x.bias": (3072,),
            "mlp_x.w1.weight": (16384, 3072),
            "mlp_x.w2.weight": (3072, 8192),
        }
        if not last:
            block |= {
                "attn.proj_y.weight": (1536, 3072),
                "attn.proj_y.bias": (1536,),
                "mlp_y.w1.weight": (8192, 1536),
                "mlp_y.w2.weight": (1536, 4096),
            }
        shapes |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return shapes


def test_released_config_has_genmo_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = AsymmDiT(DIT_PRESETS["mochi-1-preview"])
    sd = model.state_dict()
    expected = released_shapes()
    assert len(expected) == 879
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(v.numel() for v in sd.values()) == 10_027_677_744
    assert DiTConfig() == DIT_PRESETS["mochi-1-preview"]


def inputs(b: int, lengths: list[int], cfg: DiTConfig = TINY, frames: int = 2, h: int = 4, w: int = 6):
    x = torch.randn(b, cfg.in_channels, frames, h, w)
    sigma = torch.rand(b)
    text = torch.randn(b, 9, cfg.t5_feat_dim)
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    return x, sigma, text, mask


@torch.no_grad()
def test_batch_of_different_prompt_lengths_equals_separate_calls():
    model = AsymmDiT(TINY).eval()
    x, sigma, text, mask = inputs(4, [3, 9, 0, 1])
    batched = model(x, sigma, text, mask)
    for i in range(4):
        alone = model(x[i : i + 1], sigma[i : i + 1], text[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_guidance_batch_with_empty_negative_equals_separate_calls():
    model = AsymmDiT(TINY).eval()
    x, sigma, text, mask = inputs(1, [5])
    x2, sigma2 = x.repeat(2, 1, 1, 1, 1), sigma.repeat(2)
    text2 = torch.cat([text, torch.randn_like(text)])  # the empty prompt's features must never matter
    mask2 = torch.cat([mask, torch.zeros_like(mask)])
    batched = model(x2, sigma2, text2, mask2)
    torch.testing.assert_close(batched[:1], model(x, sigma, text, mask), atol=1e-5, rtol=1e-5)
    empty = model(x, sigma, torch.zeros(1, 0, TINY.t5_feat_dim), torch.zeros(1, 0, dtype=torch.bool))
    torch.testing.assert_close(batched[1:], empty, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_tokens_never_matter():
    model = AsymmDiT(TINY).eval()
    x, sigma, text, mask = inputs(2, [4, 7])
    noisy = torch.where(mask[..., None], text, torch.randn_like(text) * 100)
    assert torch.equal(model(x, sigma, text, mask), model(x, sigma, noisy, mask))
    # Longer padding changes nothing either.
    padded = torch.cat([text, torch.randn(2, 5, TINY.t5_feat_dim)], 1)
    pmask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(x, sigma, padded, pmask), model(x, sigma, text, mask), atol=1e-6, rtol=0)


@torch.no_grad()
def test_timestep_embedding_is_cos_sin_of_1000_one_minus_sigma():
    model = AsymmDiT(TINY).eval()
    seen = []
    model.t_embedder.mlp[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x, _, text, mask = inputs(2, [2, 3])
    model(x, torch.tensor([1.0, 0.75]), text, mask)
    half = TINY.timestep_embed_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    args = torch.tensor([0.0, 250.0])[:, None] * freqs
    torch.testing.assert_close(seen[0], torch.cat([args.cos(), args.sin()], -1))


def test_rope_positions_match_reference_example():
    # genmo-mochi.md §1.3.2: 480×848 px → pH=30, pW=53, s=4.815071, columns ±125.19, rows ±69.82, t=0..27.
    pos = rope_positions(28, 30, 53)
    assert pos.shape == (28 * 30 * 53, 3)
    assert pos[:, 0].max() == 27 and pos[:, 0].min() == 0
    assert pos[:, 1].max().item() == pytest.approx(69.82, abs=5e-3)
    assert pos[:, 2].max().item() == pytest.approx(125.19, abs=5e-3)
    assert pos[:, 2].min().item() == pytest.approx(-125.19, abs=5e-3)
    assert (pos[1, 2] - pos[0, 2]).item() == pytest.approx(4.815071, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_runs_without_autocast_and_keeps_fp32_islands(dtype):
    model = AsymmDiT(TINY).eval()
    x, sigma, text, mask = inputs(2, [3, 0])
    ref = model(x, sigma, text, mask)
    islands = {k: v.clone() for k, v in model.state_dict().items() if AsymmDiT.is_fp32_param(k)}
    assert len(islands) == 1 + 4 * TINY.depth
    model.to(dtype)
    for k, v in model.state_dict().items():
        if k in islands:
            assert v.dtype == torch.float32 and torch.equal(v, islands[k]), k
        else:
            assert v.dtype == dtype, k
    out = model(x.to(dtype), sigma, text.to(dtype), mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 3e-2
    assert model(x, sigma, text, mask).dtype == torch.float32  # output follows the input's dtype
    model.float()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in islands.items())


def test_islands_loaded_in_bf16_are_upcast_exactly_by_any_cast():
    model = AsymmDiT(TINY)
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.load_state_dict(bf16, assign=True)
    assert model.pos_frequencies.dtype == torch.bfloat16
    model.to(torch.bfloat16)
    for k, v in model.state_dict().items():
        assert v.dtype == (torch.float32 if AsymmDiT.is_fp32_param(k) else torch.bfloat16), k
        assert torch.equal(v.float(), bf16[k].float()), k


@torch.no_grad()
def test_meta_build_then_assign_load_gives_the_same_model():
    src = AsymmDiT(TINY).eval()
    with torch.device("meta"):
        dst = AsymmDiT(TINY)
    dst.load_state_dict(src.state_dict(), strict=True, assign=True)
    x, sigma, text, mask = inputs(1, [4])
    assert torch.equal(dst.eval()(x, sigma, text, mask), src(x, sigma, text, mask))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda a: a | {"x": a["x"][..., :5]},
            r"latent width 5 must be a multiple of the patch size 2.*4 or 6",
        ),
        (lambda a: a | {"x": a["x"][..., :3, :]}, r"latent height 3 must be a multiple of the patch size 2"),
        (lambda a: a | {"x": a["x"][:, :8]}, r"\(B, 12, T, H, W\), got shape \(2, 8, 2, 4, 6\)"),
        (lambda a: a | {"text": a["text"][..., :16]}, r"feature width must equal t5_feat_dim=32"),
        (lambda a: a | {"sigma": torch.tensor([0.5, 1.5])}, r"sigma must lie in \[0, 1\].*got 1.5"),
        (lambda a: a | {"sigma": torch.tensor([-0.1, 0.5])}, r"sigma must lie in \[0, 1\].*got -0.1"),
        (lambda a: a | {"sigma": torch.tensor([0.5, float("nan")])}, r"sigma must lie in \[0, 1\].*got nan"),
        (lambda a: a | {"sigma": a["sigma"][:1]}, r"batch sizes must match.*'sigma': 1"),
        (lambda a: a | {"text": a["text"][:1], "text_mask": a["text_mask"][:1]}, r"batch sizes must match"),
        (
            lambda a: a | {"text_mask": a["text_mask"][:, :4]},
            r"text_mask must have shape \(B, L\) = \(2, 9\)",
        ),
    ],
)
def test_bad_input_is_a_value_error_naming_value_and_rule(change, message):
    model = AsymmDiT(TINY)
    x, sigma, text, mask = inputs(2, [3, 0])
    args = change({"x": x, "sigma": sigma, "text": text, "text_mask": mask})
    with pytest.raises(ValueError, match=message):
        model(**args)


def test_attention_backends_are_checked():
    assert "sdpa" in available_backends()
    with pytest.raises(ValueError, match="'fast' is not one of 'sdpa', 'flash', 'sage'"):
        AsymmDiT(TINY, attention_backend="fast")
    for name, package in (("flash", "flash_attn"), ("sage", "sageattention")):
        if name not in available_backends():
            with pytest.raises(ImportError, match=f"needs the '{package}' package: pip install"):
                check_backend(name)
        # Where the kernel cannot run, that is said first (not "pip install", which would not help).
        for device, dtype in (("cpu", torch.bfloat16), ("cuda", torch.float32)):
            with pytest.raises(
                ValueError, match=f"'{name}' runs on CUDA in fp16 or bf16, and this model runs in"
            ):
                check_backend(name, device, dtype)


def test_an_attention_backend_that_cannot_run_is_refused_before_loading(monkeypatch):
    import mochi.pipeline

    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded first"))
    with pytest.raises(
        ValueError, match=r"'flash' runs on CUDA in fp16 or bf16, and this model runs in float32 on cpu"
    ):
        mochi.pipeline.MochiPipeline.from_pretrained(attention="flash")


def test_packed_attention_equals_separate_sdpa():
    q, k, v = (torch.randn(11, 2, 8) for _ in range(3))
    out = attention(q, k, v, [0, 4, 4, 11])  # includes an empty sequence
    for a, b in ((0, 4), (4, 11)):
        ref = torch.nn.functional.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))
        torch.testing.assert_close(out[a:b], ref.transpose(0, 1))


def test_autograd_path_matches_inference_path_and_trains():
    # Without autograd the norms and SwiGLU work in place; with it they must not; both give the same output.
    model = AsymmDiT(TINY)
    x, sigma, text, mask = inputs(2, [3, 0])
    with torch.no_grad():
        ref = model(x, sigma, text, mask)
    out = model(x, sigma, text, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pos_frequencies.grad.abs().sum() > 0
    assert model.blocks[0].mlp_y.w1.weight.grad.abs().sum() > 0  # the text stream is trained too


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash", "sage"])
@torch.no_grad()
def test_cuda_low_precision_matches_cpu_fp32(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    model = AsymmDiT(TINY).eval()
    x, sigma, text, mask = inputs(2, [3, 0])
    ref = model(x, sigma, text, mask)
    model.to("cuda", torch.bfloat16).attention_backend = backend
    assert model.pos_frequencies.dtype == torch.float32
    out = model(*(t.cuda() for t in (x, sigma, text, mask)))
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert (out.cpu() - ref).norm() / ref.norm() < 3e-2

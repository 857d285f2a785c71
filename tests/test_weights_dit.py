import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import mochi.weights.dit as dit_loader
from mochi.models.dit import DIT_PRESETS, AsymmDiT, DiTConfig
from mochi.weights.dit import infer_config, keeps_fp32, load_dit, shape_facts
from mochi.weights.io import WeightsError

from .dit_checkpoints import (
    COMFY,
    inputs,
    state_dict,
    tiny_model,
    write_comfyui,
    write_diffusers,
    write_genmo,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    """fp32 outputs of the original model, and of the model rounded to bf16 (islands fp32 after rounding)."""
    x = inputs(model)
    rounded = tiny_model()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    return x, model(*x), rounded(*x)


def _meta_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = AsymmDiT(config)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_genmo_loads_bit_exact(tmp_path, model, reference):
    x, out, _ = reference
    loaded = load_dit(write_genmo(tmp_path, model))
    assert loaded.config == model.config and not loaded.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(*x), out)


def test_diffusers_sharded_loads_bit_exact(tmp_path, model, reference):
    x, out, _ = reference
    write_diffusers(tmp_path, model)
    assert len(list((tmp_path / "transformer").glob("*-of-*.safetensors"))) > 1
    assert torch.equal(load_dit(tmp_path)(*x), out)
    assert torch.equal(load_dit(tmp_path / "transformer")(*x), out)


def test_diffusers_bf16_variant(tmp_path, model, reference):
    x, _, rounded_out = reference
    write_diffusers(tmp_path, model, variant="bf16")
    loaded = load_dit(tmp_path)
    assert loaded.x_embedder.proj.weight.dtype == torch.bfloat16
    assert loaded.pos_frequencies.dtype == torch.float32  # fp32 island, even from an all-bf16 file
    # Same weights as the original rounded to bf16, so the same outputs once computed in fp32.
    assert torch.equal(loaded.float()(*x), rounded_out)


@pytest.mark.parametrize("all_in_one", [False, True])
def test_comfyui_bf16_single_file(tmp_path, model, reference, all_in_one):
    x, _, rounded_out = reference
    loaded = load_dit(write_comfyui(tmp_path / "m.safetensors", model, all_in_one=all_in_one))
    assert loaded.blocks[0].attn.qkv_x.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.float()(*x), rounded_out)


def test_dtype_casts_all_but_fp32_islands(tmp_path, model):
    loaded = load_dit(write_genmo(tmp_path, model), dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if AsymmDiT.is_fp32_param(name) else torch.bfloat16), name
    assert torch.equal(loaded.pos_frequencies, model.pos_frequencies)  # not rounded on the way


def test_fp32_islands_agree_with_the_model():
    keys = _meta_shapes(DIT_PRESETS["mochi-1-preview"])
    assert {k for k in keys if keeps_fp32(k)} == {k for k in keys if AsymmDiT.is_fp32_param(k)}
    assert len({k for k in keys if keeps_fp32(k)}) == 1 + 4 * 48


def test_weights_are_assigned_not_copied(tmp_path, model, monkeypatch):
    seen = {}
    real = dit_loader.iter_component

    def spy(*a, **k):
        for key, t in real(*a, **k):
            seen[key] = t.data_ptr()
            yield key, t

    monkeypatch.setattr(dit_loader, "iter_component", spy)
    loaded = load_dit(write_genmo(tmp_path, model))
    assert {k: v.data_ptr() for k, v in loaded.state_dict().items()} == seen


@pytest.mark.parametrize(
    "config",
    [
        DIT_PRESETS["mochi-1-preview"],
        DIT_PRESETS["tiny"],
        DIT_PRESETS["small"],
        DiTConfig(
            depth=3, num_heads=4, hidden_size_x=64, hidden_size_y=32, t5_feat_dim=48, timestep_embed_dim=32
        ),
        DiTConfig(
            depth=1, num_heads=2, hidden_size_x=32, hidden_size_y=16, mlp_ratio_x=3.0, mlp_multiple_of=1
        ),
        DiTConfig(
            depth=2, num_heads=2, hidden_size_x=48, hidden_size_y=24, mlp_ratio_y=2.5, mlp_multiple_of=1
        ),
    ],
)
def test_config_is_inferred_from_shapes(config):
    shapes = _meta_shapes(config)
    inferred = infer_config(shapes)
    assert _meta_shapes(inferred) == shapes
    if config.mlp_ratio_x == config.mlp_ratio_y == 4.0:
        assert inferred == config
    facts = shape_facts(shapes)
    assert (facts["depth"], facts["num_heads"], facts["head_dim"]) == (
        config.depth,
        config.num_heads,
        config.head_dim,
    )


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, model):
    sd = state_dict(model)
    del sd["blocks.1.mlp_x.w2.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    sd["blocks.0.attn.q_norm_x.weight"] = torch.zeros(7)
    save_file({COMFY + k: v for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as e:
        load_dit(tmp_path / "bad.safetensors", config=model.config)
    msg = str(e.value)
    assert "detected format: comfyui (dit [genmo])" in msg
    assert "1 missing: blocks.1.mlp_x.w2.weight" in msg
    assert "1 unexpected: blocks.0.extra.weight" in msg
    assert "blocks.0.attn.q_norm_x.weight: checkpoint (7,) vs model (16,)" in msg


def test_wrong_config_is_a_shape_error(tmp_path, model):
    wrong = dataclasses.replace(model.config, hidden_size_y=24)
    match = r"format: genmo .* 12 mis-shaped: blocks.0.attn.proj_y.bias: checkpoint \(16,\) vs model \(24,\)"
    with pytest.raises(WeightsError, match=match):
        load_dit(write_genmo(tmp_path, model), config=wrong)


def test_diffusers_missing_key_names_format(tmp_path, model):
    write_diffusers(tmp_path, model, shard="1GB")
    file = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    sd = load_file(file)
    del sd["proj_out.bias"]
    save_file(sd, file)
    with pytest.raises(
        WeightsError, match=r"detected format: diffusers \(dit \[diffusers\]\).*proj_out.bias"
    ):
        load_dit(tmp_path)


def test_not_a_dit_and_bad_mode(tmp_path):
    save_file({"blocks.0.0.weight": torch.zeros(2)}, tmp_path / "decoder.safetensors")
    with pytest.raises(WeightsError, match=r"holds no DiT; it holds: vae_decoder"):
        load_dit(tmp_path / "decoder.safetensors")
    with pytest.raises(ValueError, match="fp8='fast' is not a valid mode; choose one of keep, dequantize"):
        load_dit(tmp_path / "decoder.safetensors", fp8="fast")


@pytest.mark.gpu
def test_loads_straight_to_cuda(tmp_path, model, reference):
    x, out, _ = reference
    loaded = load_dit(write_genmo(tmp_path, model), device="cuda")
    assert all(p.is_cuda for p in loaded.parameters())
    torch.testing.assert_close(loaded(*(t.cuda() for t in x)).cpu(), out, atol=1e-4, rtol=1e-4)


def test_key_map_reads_each_tensor_once(model):
    """Loading diffusers checkpoints frees each source tensor as soon as it is converted (`Consumed`)."""
    from mochi.weights.dit import Consumed
    from mochi.weights.keymaps.dit_diffusers import diffusers_to_genmo, genmo_to_diffusers

    theirs = genmo_to_diffusers(state_dict(model))
    source = dict(theirs)
    ours = diffusers_to_genmo(Consumed(source))
    assert source == {} and ours.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_config_inference_failure_names_format(tmp_path, model):
    sd = state_dict(model)
    del sd["x_embedder.proj.weight"]
    save_file(sd, tmp_path / "dit.safetensors")
    match = (
        r"format: genmo \(dit \[genmo\]\)\): cannot read the DiT's architecture: .*'x_embedder.proj.weight'"
    )
    with pytest.raises(WeightsError, match=match):
        load_dit(tmp_path)


@pytest.mark.parametrize(
    "key, tensor, message",
    [
        (
            "t5_yproj.weight",
            torch.zeros(64),
            r"'t5_yproj.weight' has shape \(64,\), where a DiT has 2 dimensions",
        ),
        ("pos_frequencies", torch.zeros(8), r"'pos_frequencies' has shape \(8,\), where a DiT has 3"),
        ("blocks.0.mlp_x.w2.weight", torch.zeros(16), r"'blocks.0.mlp_x.w2.weight' has shape \(16,\)"),
        (
            "t5_yproj.weight",
            torch.zeros(0, 0),
            r"has shape \(0, 0\), where a DiT has 2 dimensions, none of them 0",
        ),
        ("blocks.10000.attn.qkv_x.weight", torch.zeros(3, 3), r"run up to blocks.10000 but 99\d\d indices"),
    ],
)
def test_malformed_shapes_are_named_before_a_model_is_built(tmp_path, model, key, tensor, message):
    """They raised ValueError/IndexError/ZeroDivisionError, and a stray blocks.10000 built a 10001-block
    model (15 s, 0.9 GB) before failing on missing keys."""
    save_file({**state_dict(model), key: tensor}, tmp_path / "dit.safetensors")
    with pytest.raises(WeightsError, match=f"cannot read the DiT's architecture: .*{message}"):
        load_dit(tmp_path)


@pytest.mark.parametrize(
    "key, dtype",
    [("blocks.0.attn.q_norm_x.weight", torch.int32), ("blocks.0.attn.qkv_x.weight", torch.complex64)],
    ids=["int-norm", "complex"],
)
def test_weights_that_are_not_real_floats_are_refused(tmp_path, model, key, dtype):
    """An integer norm weight was cast to fp32 before the check (silently truncated); a complex weight
    counted as floating point (its imaginary part dropped at load)."""
    sd = state_dict(model)
    save_file({**sd, key: sd[key].to(dtype)}, tmp_path / "dit.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        WeightsError, match=rf"1 not floating point: {key} is {name} \(weights must be floating"
    ):
        load_dit(tmp_path)

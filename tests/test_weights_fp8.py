"""fp8_scaled checkpoints (ComfyUI, both layouts): fp8 kept in memory or dequantized, same numbers.

Tolerance against the original fp32 model: e4m3 keeps 3 mantissa bits, so each quantized weight is off by
up to 2⁻⁴ (6.25%) relative, about 2–3% RMS; summed over hundreds of products per output the errors partly
cancel, and the tiny model chains ~10 quantized matmuls. The measured relative max error is ~5%; the test
allows 10% of the output's max and also requires the error to be non-zero (the weights really went
through fp8). Against the same weights dequantized, outputs are bit-identical.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.weights.dit import load_dit
from mochi.weights.fp8 import Fp8Linear, dequantize, parameter_bytes, quantize, split_scales, swap_in_fp8
from mochi.weights.io import WeightsError

from .dit_checkpoints import (
    COMFY,
    dequantized_model,
    inputs,
    linear_weights,
    state_dict,
    tiny_model,
    write_fp8_scaled,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def x(model):
    return inputs(model)


def _block_linears(m):
    return {
        n: mod for n, mod in m.named_modules() if n.startswith("blocks.") and isinstance(mod, torch.nn.Linear)
    }


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_fp8_kept_and_dequantized_match(tmp_path, model, x, layout):
    path = write_fp8_scaled(tmp_path / "f.safetensors", model, layout=layout, rest=torch.float32)
    kept = load_dit(path, dtype=torch.float32)  # fp8="keep" is the default
    deq = load_dit(path, dtype=torch.float32, fp8="dequantize")

    linears = _block_linears(kept)
    assert linears and all(isinstance(m, Fp8Linear) for m in linears.values())
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears.values())
    assert all(m.weight_scale.dtype == torch.float32 and m.weight_scale.ndim == 0 for m in linears.values())
    # Outside the blocks, quantized layers are dequantized (their dtype is read as a compute dtype).
    assert kept.t_embedder.mlp[0].weight.dtype == torch.float32
    assert not any(isinstance(m, Fp8Linear) for m in deq.modules())

    out = kept(*x)
    assert torch.equal(out, deq(*x))
    assert torch.equal(out, dequantized_model(model)(*x))
    ref = model(*x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert 1e-4 < err < 0.1


def test_fp8_in_bf16_keep_equals_dequantize(tmp_path, model, x):
    path = write_fp8_scaled(tmp_path / "f.safetensors", model, layout="legacy")
    kept = load_dit(path)  # dtype of the file's other tensors: bf16
    deq = load_dit(path, fp8="dequantize")
    assert kept.dtype == deq.dtype == torch.bfloat16
    assert deq.blocks[0].mlp_x.w1.weight.dtype == torch.bfloat16
    # Fp8Linear forms w·s in fp32 and rounds once, exactly as dequantize does.
    assert torch.equal(kept(*x), deq(*x))


def test_fp8_memory_is_about_half_of_bf16(tmp_path, model):
    path = write_fp8_scaled(tmp_path / "f.safetensors", model, layout="new")
    kept = load_dit(path)
    bf16 = load_dit(path, fp8="dequantize")
    for name, m in _block_linears(kept).items():
        ref = bf16.get_submodule(name).weight
        assert m.weight.numel() * m.weight.element_size() * 2 == ref.numel() * ref.element_size()
    # At full size the blocks' Linears are ~97% of the weights: the whole model is ~0.51× its bf16 size.
    with torch.device("meta"):
        full = AsymmDiT(DIT_PRESETS["mochi-1-preview"]).to(torch.bfloat16)
    before = parameter_bytes(full)
    layers = [
        n for n, m in full.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)
    ]
    swap_in_fp8(full, layers, dict.fromkeys(layers, torch.float8_e4m3fn))
    assert 0.50 < parameter_bytes(full) / before < 0.52


def test_module_casts_leave_fp8_and_scales_alone(tmp_path, model):
    kept = load_dit(write_fp8_scaled(tmp_path / "f.safetensors", model, layout="new", rest=torch.float32))
    layer = kept.blocks[0].attn.qkv_x
    weight, scale = layer.weight.view(torch.uint8).clone(), layer.weight_scale.clone()
    kept.to(torch.bfloat16)
    assert kept.x_embedder.proj.weight.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8), weight)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)


def test_split_scales_handles_both_layouts_and_plain_fp8():
    w, s = quantize(torch.randn(6, 4))
    legacy = {
        "scaled_fp8": torch.empty(0),
        "a.weight": w,
        "a.scale_weight": s,
        "a.scale_input": torch.tensor(1.0),
    }
    conf = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    new = {
        "a.weight": w,
        "a.weight_scale": s.reshape(1),
        "a.comfy_quant": conf,
        "a.input_scale": torch.tensor(2.0),
    }
    for sd in (legacy, new):
        tensors, scales = split_scales(sd)
        assert tensors.keys() == {"a.weight"} and torch.equal(scales["a"], s)
    # fp8 weights with no scale (plain fp8 files) get scale 1; per-row scales are kept as (out, 1).
    _, scales = split_scales({"a.weight": w})
    assert scales["a"].item() == 1.0
    rows = torch.rand(6)
    _, scales = split_scales({"a.weight": w, "a.weight_scale": rows})
    assert scales["a"].shape == (6, 1)
    assert torch.equal(dequantize(w, scales["a"], torch.float32), w.float() * rows[:, None])


def test_unsupported_quant_format_is_named(tmp_path, model):
    sd = {COMFY + k: v for k, v in state_dict(model).items()}
    meta = {
        "_quantization_metadata": json.dumps({"layers": {COMFY + "blocks.0.attn.qkv_x": {"format": "nvfp4"}}})
    }
    save_file(sd, tmp_path / "q.safetensors", metadata=meta)
    with pytest.raises(
        WeightsError, match=r"format 'nvfp4' of layer 'blocks.0.attn.qkv_x' .* supported: float8_e4m3fn"
    ):
        load_dit(tmp_path / "q.safetensors")


def test_quantize_round_trip_error_is_fp8_rounding():
    w = torch.randn(64, 64)
    q, s = quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == ()
    assert (q.float().abs().max() * s - w.abs().max()).abs() < 1e-6  # amax maps to 448 exactly
    rel = ((dequantize(q, s, torch.float32) - w).abs() / w.abs()).masked_select(w.abs() > w.abs().max() / 64)
    assert rel.max() <= 2**-4 + 1e-6  # half a step of a 3-bit mantissa for normal values


@pytest.mark.gpu
def test_fp8_on_cuda(tmp_path, model, x):
    path = write_fp8_scaled(tmp_path / "f.safetensors", model, layout="new")
    kept = load_dit(path, device="cuda")
    deq = load_dit(path, device="cuda", fp8="dequantize")
    xs = [t.cuda() for t in x]
    assert kept.blocks[0].attn.qkv_x.weight.is_cuda
    torch.testing.assert_close(kept(*xs), deq(*xs), atol=0, rtol=0)


def test_every_linear_is_quantized_in_the_test_file(tmp_path, model):
    from mochi.weights.formats import component_keys, detect

    keys = component_keys(detect(write_fp8_scaled(tmp_path / "f.safetensors", model, layout="legacy")), "dit")
    fp8 = {k for k, (d, _) in keys.items() if d == "F8_E4M3" and k != "scaled_fp8"}
    assert fp8 == set(linear_weights(model))
    assert keys["x_embedder.proj.weight"][0] == "BF16" and keys["pos_frequencies"][0] == "BF16"


def test_plain_fp8_file_without_scales(tmp_path, model, x):
    """Unscaled fp8 files (weights cast straight to e4m3fn): scale 1, same numbers kept or dequantized."""
    from mochi.weights.formats import detect

    sd = state_dict(model)
    sd.update({k: sd[k].to(torch.float8_e4m3fn) for k in linear_weights(model)})
    save_file(sd, tmp_path / "dit.safetensors")
    assert detect(tmp_path).quant == {"dit": "fp8"}
    kept = load_dit(tmp_path, dtype=torch.float32)
    assert kept.blocks[1].mlp_x.w2.weight.dtype == torch.float8_e4m3fn
    assert kept.blocks[1].mlp_x.w2.weight_scale.item() == 1.0
    assert torch.equal(kept(*x), load_dit(tmp_path, dtype=torch.float32, fp8="dequantize")(*x))


@pytest.mark.parametrize("shape", ["(out,)", "(out, 1)"])
def test_per_row_scales_load_kept_as_fp8(tmp_path, model, x, shape):
    """One scale per output row (`split_scales` takes them): kept fp8, the same numbers as dequantized.
    Fp8Linear's 0-d scale buffer used to refuse them with torch's size-mismatch error."""
    sd = state_dict(model)
    for key in linear_weights(model):
        w = sd[key].float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-12)
        sd[key] = (w / scale).to(torch.float8_e4m3fn)
        sd[key.removesuffix(".weight") + ".weight_scale"] = scale if shape == "(out, 1)" else scale.flatten()
    save_file(sd, tmp_path / "dit.safetensors")
    kept = load_dit(tmp_path, dtype=torch.float32)
    layer = kept.blocks[1].mlp_x.w2
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (layer.out_features, 1)
    assert torch.equal(kept(*x), load_dit(tmp_path, dtype=torch.float32, fp8="dequantize")(*x))


@pytest.mark.parametrize("layout, scale", [("legacy", ".scale_weight"), ("new", ".weight_scale")])
def test_a_scaled_file_missing_one_scale_is_refused(tmp_path, model, layout, scale):
    """Read at scale 1, the layer came out ~1/scale (about 2000x) too large, silently."""
    from safetensors.torch import load_file

    path = write_fp8_scaled(tmp_path / "fp8.safetensors", model, layout=layout, all_in_one=False)
    sd = load_file(path)
    del sd[COMFY + "blocks.0.attn.qkv_x" + scale]
    save_file(sd, path)
    with pytest.raises(WeightsError, match=r"fp8 weight '.*blocks\.0\.attn\.qkv_x\.weight' has no scale"):
        load_dit(path)


@pytest.mark.parametrize("fp8", ["keep", "dequantize"])
def test_a_non_finite_fp8_scale_is_refused_at_load(tmp_path, model, fp8):
    """Kept fp8, the scale only met the weights at use: the load passed and sampling made NaN."""
    from safetensors.torch import load_file

    from mochi.finite import NonFiniteError

    path = write_fp8_scaled(tmp_path / "fp8.safetensors", model, layout="legacy", all_in_one=False)
    sd = load_file(path)
    sd[COMFY + "blocks.0.attn.qkv_x.scale_weight"] = torch.tensor(float("nan"))
    save_file(sd, path)
    with pytest.raises(NonFiniteError, match=r"holds NaN or infinite values .*blocks\.0\.attn\.qkv_x"):
        load_dit(path, fp8=fp8)


@pytest.mark.parametrize(
    "metadata, extra, message",
    [
        ({"_quantization_metadata": "{oops"}, {}, r"metadata '_quantization_metadata' is not valid JSON"),
        (
            {"_quantization_metadata": "[1]"},
            {},
            r"metadata '_quantization_metadata' holds \[1\], not a JSON object",
        ),
        ({"_quantization_metadata": '{"layers": 3}'}, {}, r"field 'layers' is 3, not a JSON object"),
        ({"_quantization_metadata": '{"layers": {"a": 7}}'}, {}, r"layer 'a' has format 7; expected a name"),
        (
            None,
            {"blocks.0.attn.qkv_x.comfy_quant": list(b"{x")},
            r"tensor '.*qkv_x.comfy_quant' is not valid JSON",
        ),
    ],
)
def test_malformed_quantization_metadata_is_named(tmp_path, model, metadata, extra, message):
    """They raised JSONDecodeError / AttributeError from deep in the format detection."""
    from safetensors.torch import load_file

    sd = load_file(write_fp8_scaled(tmp_path / "fp8.safetensors", model, layout="new", all_in_one=False))
    sd.update({COMFY + k: torch.tensor(v, dtype=torch.uint8) for k, v in extra.items()})
    save_file(sd, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(WeightsError, match=message):
        load_dit(tmp_path / "bad.safetensors")

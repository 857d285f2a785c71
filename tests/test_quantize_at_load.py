"""Quantization while the DiT is read (mochi.weights.dit.load_dit_quantized): the same model as
quantizing after a whole load, with the load's peak about the quantized model plus one layer.

Peaks are counted with ``LiveBytes`` (storages created while loading: the cast copies of the weights, the
quantized tensors): a bf16 file read into fp32 makes every weight a fresh fp32 tensor, which a whole load
holds all at once before quantizing, and a load that quantizes as it reads holds one at a time.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mochi.memory.trace import LiveBytes
from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.weights.dit import load_dit, load_dit_quantized
from mochi.weights.quantize import quantize_model, stored_bytes

from .dit_checkpoints import COMFY, inputs, write_comfyui, write_diffusers, write_genmo

CFG = dataclasses.replace(DIT_PRESETS["tiny"], depth=4, num_heads=4, hidden_size_x=128, hidden_size_y=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AsymmDiT(CFG).eval().requires_grad_(False).to(torch.bfloat16)


@pytest.mark.parametrize(("layout", "mode"), [("genmo", "int8"), ("diffusers", "q4_0"), ("comfyui", "int8")])
@torch.inference_mode()
def test_quantized_while_reading_equals_quantized_after(model, tmp_path, layout, mode):
    if layout == "genmo":
        path = write_genmo(tmp_path, model)
    elif layout == "diffusers":
        path = write_diffusers(tmp_path, model)
    else:
        path = write_comfyui(tmp_path / "mochi.safetensors", model, all_in_one=True)
    with LiveBytes("cpu") as whole:
        after = load_dit(path, dtype=torch.float32)
        done_after = quantize_model(after, mode)
    with LiveBytes("cpu") as streamed:
        got, done = load_dit_quantized(path, mode, dtype=torch.float32)
    assert (done.layers, done.skipped, done.kept) == (done_after.layers, done_after.skipped, [])
    assert len(done.layers) + len(done.skipped) == 3 * 10 + 7  # the last block: no text MLP nor proj_y
    assert [type(m) for m in got.modules()] == [type(m) for m in after.modules()]
    x = inputs(got)
    assert torch.equal(got(*x), after(*x))
    quantized = stored_bytes(got)
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    # Whole: the fp32 model, then the quantized copies beside it. Streamed: the quantized model and one
    # fp32 layer at a time (the largest, a block's mlp_x.w1; with the transients of fusing q/k/v and of
    # the quantizer).
    layer = 4 * max(p.numel() for p in model.parameters())
    assert whole.peak >= fp32
    assert streamed.peak <= quantized + 3 * layer, (streamed.peak, quantized, layer)
    assert streamed.peak < 0.5 * whole.peak, (streamed.peak, whole.peak)


def test_a_damaged_weight_is_named_before_it_is_quantized(model, tmp_path):
    from safetensors.torch import save_file

    sd = {COMFY + k: v.clone().contiguous() for k, v in model.state_dict().items()}
    sd[COMFY + "blocks.1.mlp_x.w2.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(
        ValueError, match=r"NaN or infinite values in 1 of 1 tensors \(blocks\.1\.mlp_x\.w2\.weight\)"
    ):
        load_dit_quantized(tmp_path / "bad.safetensors", "int8")


def test_pipeline_quantizes_the_dit_while_reading_it(tmp_path):
    from mochi.pipeline import MochiPipeline
    from mochi.request import GenerationRequest

    from .test_components import WORDS, _write_diffusers, _write_tokenizer
    from .test_pipeline import DEFAULTS, tiny_components

    _write_diffusers(tmp_path, tiny_components(seed=1))
    _write_tokenizer(tmp_path / "tokenizer", WORDS)
    (tmp_path / "model_index.json").write_text('{"_class_name": "MochiPipeline"}')
    pipe = MochiPipeline.from_pretrained(str(tmp_path), device="cpu", quantize="int8")
    assert set(pipe.components.quantized) == {"dit", "t5"}  # done by the readers, not after loading
    c = tiny_components(seed=1)
    c.tokenizer = pipe.components.tokenizer
    after = MochiPipeline(c, device="cpu", quantize="int8")  # quantized after a whole load
    assert pipe.quantization == after.quantization
    assert pipe.quantization.startswith("dit: ") and "; t5: " in pipe.quantization
    request = GenerationRequest("a red circle", seed=2, steps=2)
    pipe.components.defaults = after.components.defaults = dict(DEFAULTS)
    assert torch.equal(pipe.generate(request).frames, after.generate(request).frames)


@pytest.mark.parametrize("layout", ["hf", "comfyui"])
@torch.inference_mode()
def test_t5_quantized_while_reading_equals_quantized_after(tmp_path, layout):
    from mochi.models.t5 import T5_PRESETS, T5Encoder
    from mochi.weights.io import save_state_dict
    from mochi.weights.t5 import load_t5, load_t5_quantized

    torch.manual_seed(0)
    t5 = T5Encoder(dataclasses.replace(T5_PRESETS["t5-tiny"], d_model=64, d_ff=256, num_layers=3))
    t5.initialize_weights()
    sd = {k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}
    if layout == "comfyui":  # all-in-one: the T5 under ComfyUI's prefix, beside other tensors
        prefix = "text_encoders.t5xxl.transformer."
        path = tmp_path / "a.safetensors"
        save_state_dict({"other.weight": torch.ones(3), **{prefix + k: v for k, v in sd.items()}}, path)
    else:
        save_state_dict(sd, tmp_path / "t5.safetensors")
        path = tmp_path / "t5.safetensors"
    with LiveBytes("cpu") as whole:
        after = load_t5(path)
        done_after = quantize_model(after, "int8")
    with LiveBytes("cpu") as streamed:
        got, done = load_t5_quantized(path, "int8")
    assert done.layers == done_after.layers and len(done.layers) == 3 * 7
    ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4]).bool()
    assert torch.equal(got(ids, mask), after(ids, mask))
    layer = 4 * max(p.numel() for n, p in t5.named_parameters() if ".block." in n)
    assert streamed.peak <= stored_bytes(got) + 3 * layer and streamed.peak < 0.6 * whole.peak


def test_fp8_layers_kept_or_widened_with_quantize(model, tmp_path):
    from .dit_checkpoints import write_fp8_scaled

    fp32 = copy.deepcopy(model).float()  # .float() is in place: leave the shared model as it is
    path = write_fp8_scaled(tmp_path / "fp8.safetensors", fp32, layout="legacy", all_in_one=False)
    kept, done = load_dit_quantized(path, "int8", dtype=torch.float32)  # fp8 stays fp8: not quantized again
    assert done.layers == [] and len(done.kept) == 37
    with LiveBytes("cpu") as streamed:
        widened, done = load_dit_quantized(path, "int8", dtype=torch.float32, fp8="dequantize")
    assert len(done.layers) == 37 and done.kept == []  # widened at load, then quantized like the rest
    with LiveBytes("cpu") as whole:
        after = load_dit(path, dtype=torch.float32, fp8="dequantize")
        quantize_model(after, "int8")
    x = inputs(widened)
    assert torch.equal(widened(*x), after(*x))
    # Each fp8 layer widened and quantized in turn: the whole widened model (fp32 here) never exists.
    layer = 4 * max(p.numel() for p in model.parameters())
    assert whole.peak >= 4 * sum(p.numel() for p in model.parameters())
    assert streamed.peak <= stored_bytes(widened) + 3 * layer, (streamed.peak, stored_bytes(widened), layer)


@pytest.mark.parametrize("layout", ["legacy", "new"])
@torch.inference_mode()
def test_t5_fp8_scaled_file_is_quantized_like_a_widened_load(tmp_path, layout):
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled: T5 widens fp8 at load, so --quantize must quantize those weights
    (they used to stay full width in fp32, with the note "0 Linear layers quantized")."""
    from mochi.models.t5 import T5_PRESETS, T5Encoder
    from mochi.weights.io import save_state_dict
    from mochi.weights.t5 import load_t5, load_t5_quantized

    from .test_t5 import quantize_fp8

    torch.manual_seed(0)
    t5 = T5Encoder(dataclasses.replace(T5_PRESETS["t5-tiny"], d_model=64, d_ff=256, num_layers=3))
    t5.initialize_weights()
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_state_dict(quantize_fp8(t5.state_dict(), layout), path)
    ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4]).bool()
    for mode in ("int8", "q8_0"):
        after = load_t5(path)
        done_after = quantize_model(after, mode)
        got, done = load_t5_quantized(path, mode)
        assert done.layers == done_after.layers and len(done.layers) == 3 * 7, done.note("t5")
        assert stored_bytes(got) == stored_bytes(after) < 0.5 * stored_bytes(load_t5(path))
        assert torch.equal(got(ids, mask), after(ids, mask))


def test_a_second_pipeline_on_quantized_components_refuses_another_mode_and_says_what_holds(tmp_path):
    """A pipeline made with quantize="q4_0" on components quantized to int8 as they were read said "dit: 17
    Linear layers quantized to int8 ..." as if asked for int8, and one made without quantize said None; on
    components a first pipeline had quantized, q4_0 claimed the int8 layers were "already quantized in the
    checkpoint". Another mode is now refused, and ``quantization`` says what holds."""
    from mochi.pipeline import MochiPipeline
    from mochi.weights.components import load_components

    from .test_components import WORDS, _write_diffusers, _write_tokenizer
    from .test_pipeline import tiny_components

    _write_diffusers(tmp_path, tiny_components(seed=1))
    _write_tokenizer(tmp_path / "tokenizer", WORDS)
    (tmp_path / "model_index.json").write_text('{"_class_name": "MochiPipeline"}')
    at_load = load_components(str(tmp_path), quantize="int8")
    after = tiny_components(seed=1)
    first = MochiPipeline(after, device="cpu", quantize="int8")
    for c in (at_load, after):
        held = "; ".join(c.quantized.values())
        assert held.startswith("dit: 17 Linear layers quantized to int8") and "; t5: 14 Linear" in held
        with pytest.raises(ValueError) as caught:
            MochiPipeline(c, device="cpu", quantize="q4_0")
        assert str(caught.value) == (
            "quantize='q4_0': these components' dit and t5 are quantized to int8 already, and a weight is "
            "quantized once; pass quantize='int8' or None, or load the components again to quantize them to "
            "q4_0"
        )
        assert MochiPipeline(c, device="cpu", quantize="int8").quantization == held
        assert MochiPipeline(c, device="cpu").quantization == held
    assert first.quantization == "; ".join(after.quantized.values())

"""Weight-only quantization at load (int8, fp8, q8_0, q4_0): which layers, scales, compute dtype, bytes per
parameter of the released DiT, LoRA on quantized layers, generation with the embedded model, bad input."""

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import mochi.pipeline
import mochi.weights.quantize as quantize_mod
from mochi.cli import main
from mochi.models.dit import AsymmDiT, DiTConfig
from mochi.models.lora import LoraLayer, apply_lora, target_modules
from mochi.models.t5 import T5Config, T5Encoder
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.weights.bundle import load_embedded
from mochi.weights.fp8 import Fp8Linear
from mochi.weights.ggml import GgufLinear
from mochi.weights.quantize import (
    MODES,
    Int8Linear,
    check_mode,
    device_mode,
    is_quantized,
    quantize_linear,
    quantize_model,
    stored_bytes,
    torchao_available,
    weight_bytes,
)

from .test_pipeline import tiny_components

# Relative error of the final latents against the unquantized model (embedded model, 3 steps); measured
# 0.6-1.7% for int8/fp8/q8_0 and ~9% for q4_0.
LATENT_TOL = {"int8": 0.05, "fp8": 0.08, "q8_0": 0.05, "q4_0": 0.3}


@pytest.fixture(scope="module")
def embedded():
    return load_embedded()


@pytest.fixture(scope="module")
def reference(embedded):
    pipe = MochiPipeline(copy.deepcopy(embedded), device="cpu")
    return pipe.generate(GenerationRequest("a blue square moving up", seed=4, steps=3))


def _x(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
    return (
        x,
        torch.tensor([0.7]),
        torch.randn(1, 6, cfg.t5_feat_dim, generator=g),
        torch.ones(1, 6, dtype=torch.bool),
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_generates_with_the_embedded_model(embedded, reference, mode):
    pipe = MochiPipeline(copy.deepcopy(embedded), device="cpu", quantize=mode)
    ran = mode if mode != "int8" else "int8 (torchao)" if torchao_available() else "int8 (mochi's Int8Linear)"
    assert (
        pipe.quantization
        == f"dit: 37 Linear layers quantized to {ran}; t5: 14 Linear layers quantized to {ran}"
    )
    req = GenerationRequest("a blue square moving up", seed=4, steps=3)
    out = pipe.generate(req)
    assert out.frames.shape == reference.frames.shape == (1, 25, 64, 64, 3)
    assert torch.equal(pipe.generate(req).frames, out.frames)  # same request and seed: identical
    err = ((out.latents - reference.latents).norm() / reference.latents.norm()).item()
    assert 0 < err < LATENT_TOL[mode]


@pytest.mark.parametrize("mode", MODES)
def test_which_layers_are_quantized(embedded, mode):
    dit, t5 = copy.deepcopy(embedded.dit), copy.deepcopy(embedded.text_encoder)
    quantize_model(dit, mode)
    quantize_model(t5, mode)
    for name, m in [*dit.named_modules(), *t5.named_modules()]:
        if isinstance(m, nn.Linear):
            inside = name.startswith(("blocks.", "encoder.block."))
            assert is_quantized(m) == inside, name
    # Kept: the conditioning path, the final layer, the patch embedding, norms, fp32 islands, embeddings.
    for m in (dit.t_embedder.mlp[0], dit.t5_y_embedder.to_kv, dit.t5_yproj, dit.final_layer.linear):
        assert type(m) is nn.Linear and type(m.weight) is nn.Parameter
    assert (
        dit.pos_frequencies.dtype == torch.float32
        and dit.blocks[0].attn.q_norm_x.weight.dtype == torch.float32
    )
    assert type(t5.shared) is nn.Embedding and t5.shared.weight.dtype == torch.float32
    kinds = {"fp8": Fp8Linear, "q8_0": GgufLinear, "q4_0": GgufLinear}
    if mode in kinds:
        assert isinstance(dit.blocks[0].attn.qkv_x, kinds[mode])


def test_per_row_scales(monkeypatch):
    lin = nn.Linear(64, 5)
    with torch.no_grad():
        lin.weight[2] *= 100  # one row far larger: per-row scales keep the other rows fine
    w = lin.weight.detach().clone()
    monkeypatch.setattr(quantize_mod, "torchao_available", lambda: False)
    for mode, qmax, cls in (("int8", 127, Int8Linear), ("fp8", 448, Fp8Linear)):
        q = quantize_linear(copy.deepcopy(lin), mode)
        assert type(q) is cls and q.weight_scale.shape == (5, 1)
        assert torch.equal(q.weight_scale, w.abs().amax(1, keepdim=True) / qmax)
        deq = q.weight.float() * q.weight_scale
        bound = q.weight_scale / 2 if mode == "int8" else w.abs() * 2**-4 + 2**-9 * q.weight_scale
        assert ((deq - w).abs() <= bound * 1.0001).all()
        assert torch.equal(q.bias, lin.bias)


def test_int8_uses_torchao_when_installed():
    pytest.importorskip("torchao")
    lin = nn.Linear(64, 8)
    w = lin.weight.detach().clone()
    q = quantize_linear(lin, "int8")
    assert is_quantized(q) and type(q) is nn.Linear and q.weight.qdata.dtype == torch.int8
    assert q.weight.scale.numel() == 8  # one scale per output row
    assert (q.weight.dequantize() - w).abs().max() <= q.weight.scale.max()


@pytest.mark.parametrize("mode", MODES)
def test_compute_dtype_is_the_models(embedded, mode):
    dit = copy.deepcopy(embedded.dit).to(torch.bfloat16)
    quantize_model(dit, mode)
    dit.to(torch.bfloat16)  # a later cast leaves the quantized storage alone
    layer = dit.blocks[1].mlp_x.w1
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    out = dit(*[t.to(torch.bfloat16) if t.is_floating_point() else t for t in _x(dit.config)])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", MODES)
def test_lora_applies_unmerged_to_quantized_layers(embedded, mode):
    dit = copy.deepcopy(embedded.dit)
    quantize_model(dit, mode)
    g = torch.Generator().manual_seed(3)
    layers = {
        name: LoraLayer(
            torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g), 8.0
        )
        for name, m in target_modules(dit).items()
    }
    assert layers and all(is_quantized(dit.get_submodule(n)) for n in layers)
    name = "blocks.2.attn.qkv_x"
    x = torch.randn(5, 128)
    base = dit.get_submodule(name)(x)
    handle = apply_lora(dit, layers, scale=0.5)
    lora = layers[name]
    want = base + (x @ lora.A.T @ lora.B.T) * (0.5 * lora.scaling)
    torch.testing.assert_close(dit.get_submodule(name)(x), want, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert torch.equal(dit.get_submodule(name)(x), base)
    with pytest.raises(ValueError, match="cannot merge a LoRA into quantized weights"):
        apply_lora(dit, layers, merge=True)


@pytest.mark.parametrize("mode", MODES)
def test_quantizing_after_a_lora_is_applied(embedded, mode):
    """An unmerged LoRA applied before quantizing stays on (fp8/q8_0/q4_0 replace the layer, which used to
    drop its hooks silently) and still comes off; a merged or trainable one is refused, nothing changed."""
    from mochi.models.lora import add_trainable_lora

    g = torch.Generator().manual_seed(3)
    dit = copy.deepcopy(embedded.dit)
    layers = {
        name: LoraLayer(
            torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g), 8.0
        )
        for name, m in target_modules(dit).items()
    }
    name, x = "blocks.2.attn.qkv_x", torch.randn(5, 128)
    first = apply_lora(dit, layers, scale=0.5)
    quantize_model(dit, mode)
    got = dit.get_submodule(name)(x)
    first.remove()
    base = dit.get_submodule(name)(x)
    then = apply_lora(dit, layers, scale=0.5)  # the documented order: quantize, then apply
    assert torch.equal(got, dit.get_submodule(name)(x)) and not torch.equal(got, base)
    then.remove()

    for add in (lambda m: apply_lora(m, layers, merge=True), lambda m: add_trainable_lora(m)):
        dit = copy.deepcopy(embedded.dit)
        add(dit)
        with pytest.raises(ValueError, match="blocks.0.attn.qkv_x"):
            quantize_model(dit, mode)
        assert not any(is_quantized(m) for m in dit.modules())


def test_bytes_per_parameter_of_the_released_dit():
    with torch.device("meta"):
        dit = AsymmDiT(DiTConfig())
        t5 = T5Encoder(T5Config())
    bf16 = weight_bytes(dit, None)
    assert bf16["params"] == 10_027_677_744
    per = {mode: weight_bytes(dit, mode)["total"] / bf16["params"] for mode in MODES}
    assert 1.011 < per["fp8"] < 1.012
    # torchao's int8 tensor keeps an int8 zero point per row too: 1 byte per row more than fp8.
    assert 1.0116 < per["int8"] < 1.0117 if quantize_mod.torchao_installed() else per["int8"] == per["fp8"]
    assert 1.071 < per["q8_0"] < 1.073 and 0.576 < per["q4_0"] < 0.578
    q8 = weight_bytes(dit, "q8_0")
    assert q8["quantized"] == q8["quantized_params"] * 34 // 32
    assert q8["quantized_params"] / q8["params"] > 0.99  # the blocks hold 99% of the weights
    assert 1.99 < bf16["total"] / bf16["params"] < 2.01
    assert (
        weight_bytes(t5, "int8", torch.float32)["total"]
        < weight_bytes(t5, None, torch.float32)["total"] / 3.5
    )


@pytest.mark.parametrize("torchao", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_weight_bytes_are_the_bytes_a_quantized_model_holds(monkeypatch, mode, torchao):
    """The estimate counted int8 at 1 + 4/in bytes per weight, while torchao's int8 tensor also stores an
    int8 zero point per row (1 + 5/in): a tiny DiT held one byte per quantized row more than estimated."""
    from mochi.memory.estimate import quantized_linear_bytes
    from mochi.models.dit import DIT_PRESETS

    if torchao and not quantize_mod.torchao_available():
        pytest.skip("torchao is not installed")
    monkeypatch.setattr(quantize_mod, "torchao_available", lambda: torchao)  # what quantizes
    monkeypatch.setattr(quantize_mod, "torchao_installed", lambda: torchao)  # what the estimate goes by
    torch.manual_seed(0)
    cfg = dataclasses.replace(DIT_PRESETS["tiny"], depth=2, num_heads=4, hidden_size_x=128, hidden_size_y=64)
    dit = AsymmDiT(cfg).to(torch.bfloat16)
    estimate = weight_bytes(dit, mode)
    quantize_model(dit, mode)
    assert stored_bytes(dit) == estimate["total"]
    linear = dit.blocks[0].mlp_x.w1  # no bias: its bytes are the weight's and the scales'
    expected = quantized_linear_bytes(mode, linear.out_features, linear.in_features, torch.bfloat16)
    assert stored_bytes(linear) == expected


def test_fp8_falls_back_where_the_device_cannot_hold_it(embedded, monkeypatch):
    assert device_mode("fp8", torch.device("cpu")) == ("fp8", None)
    mode, note = device_mode("fp8", torch.device("mps"), supported=lambda d: False)
    assert mode == "int8" and note == "mps cannot hold fp8 tensors; quantizing to int8 instead (same memory)"
    monkeypatch.setattr(quantize_mod, "fp8_supported", lambda d: False)
    pipe = MochiPipeline(copy.deepcopy(embedded), device="cpu", quantize="fp8")
    assert pipe.quantization.startswith("cpu cannot hold fp8 tensors; quantizing to int8 instead")
    assert not isinstance(pipe.components.dit.blocks[0].attn.qkv_x, Fp8Linear)


def test_already_quantized_layers_are_kept(embedded):
    dit = copy.deepcopy(embedded.dit)
    quantize_model(dit, "q4_0")
    before = dit.blocks[0].attn.qkv_x.qweight.clone()
    report = quantize_model(dit, "int8")
    assert report.layers == [] and len(report.kept) == 37
    assert report.note("dit") == (
        "dit: 0 Linear layers quantized to int8; 37 already quantized in the checkpoint kept as stored"
    )
    assert torch.equal(dit.blocks[0].attn.qkv_x.qweight, before)


def test_bad_mode_is_one_line_before_loading(monkeypatch):
    with pytest.raises(
        ValueError, match=r"^quantization 'int4' is not supported; choose one of int8, fp8, q8_0, "
    ):
        check_mode("int4")
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="'Q8_0' is not supported.*nearest: q8_0"):
        MochiPipeline.from_pretrained(quantize="Q8_0")


def test_cli_generate_quantize(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    out = tmp_path / "q.mp4"
    assert (
        main(["generate", "x", "--seed", "1", "--steps", "1", "--quantize", "q8_0", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    # The tiny test DiT's text stream is 16 wide: those layers cannot take 32-weight blocks.
    assert (
        "mochi: note: dit: 11 Linear layers quantized to q8_0; 6 left unquantized (input width not a " in text
    )
    assert json.loads(out.with_suffix(".json").read_text())["quantize"] == "q8_0"
    with pytest.raises(SystemExit):
        main(["generate", "x", "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_serve_takes_quantize():
    from mochi.cli import build_parser
    from mochi.cli.options import pipeline_options

    args = build_parser().parse_args(["serve", "--quantize", "q4_0"])
    assert pipeline_options(args)["quantize"] == "q4_0"


@pytest.mark.parametrize("torchao", [True, False], ids=["torchao", "mochi"])
def test_the_int8_note_says_which_implementation_ran(monkeypatch, torchao):
    """torchao (absmax/127.5, -128..127) and Int8Linear (absmax/127) round differently: the note, which
    the CLI prints and the sidecar keeps, names the one that ran."""
    if torchao and not quantize_mod.torchao_available():
        pytest.skip("torchao is not installed")
    monkeypatch.setattr(quantize_mod, "torchao_available", lambda: torchao)
    c = tiny_components()
    done = quantize_mod.quantize_model(c.dit, "int8")
    expected = "int8 (torchao)" if torchao else "int8 (mochi's Int8Linear)"
    assert done.note("dit").startswith(f"dit: {len(done.layers)} Linear layers quantized to {expected}")
    assert all(isinstance(c.dit.get_submodule(n), Int8Linear) != torchao for n in done.layers)


@pytest.mark.skipif(not quantize_mod.torchao_installed(), reason="torchao is not installed")
def test_importing_torchao_prints_nothing_of_its_own():
    """Newer torch logs a warning line per torchao enum it registers ("register_constant() on Enum
    subclasses is deprecated"): they came above every --quantize int8 run."""
    import subprocess
    import sys

    code = "import mochi.weights.quantize as q; assert q.torchao_available()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "register_constant" not in done.stderr and "W1" not in done.stderr, done.stderr[-2000:]

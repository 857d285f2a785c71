"""LoRA layers, merging, files in Genmo's and the diffusers/PEFT format, parity with peft in diffusers."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mochi.models.dit import AsymmDiT, DiTConfig
from mochi.models.lora import (
    BLOCK_LINEARS,
    LoraLayer,
    add_trainable_lora,
    apply_lora,
    remove_trainable_lora,
    target_modules,
    trainable_lora_state_dict,
)
from mochi.weights.io import WeightsError, read_metadata
from mochi.weights.lora import convert_lora, from_diffusers, read_lora, save_lora, to_diffusers

CFG = DiTConfig(depth=3, num_heads=2, hidden_size_x=32, hidden_size_y=16, t5_feat_dim=24, mlp_multiple_of=1)


def model(seed: int = 0) -> AsymmDiT:
    torch.manual_seed(seed)
    return AsymmDiT(CFG).eval().requires_grad_(False)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 2, 4, 4, generator=g)
    text = torch.randn(2, 5, CFG.t5_feat_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return x, torch.tensor([0.3, 0.8]), text, mask


def random_lora(m: AsymmDiT, rank: int = 4, alpha: float = 8.0, seed: int = 2, targets=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, lin in target_modules(m, targets or ("qkv_x", "qkv_y", "proj_x", "proj_y")).items():
        a = torch.randn(rank, lin.in_features, generator=g) * 0.3
        b = torch.randn(lin.out_features, rank, generator=g) * 0.3
        layers[name] = LoraLayer(a, b, alpha)
    return layers


def test_trainable_lora_has_genmo_keys_shapes_and_init():
    m = model()
    names = add_trainable_lora(m, rank=4, alpha=4)
    # 3 blocks × (qkv_x, qkv_y, proj_x) + proj_y in the 2 blocks that update text; none in the last.
    assert len(names) == 11 and "blocks.2.attn.proj_y" not in names
    sd = trainable_lora_state_dict(m)
    assert sd["blocks.0.attn.qkv_x.lora_A"].shape == (4, 32)
    assert sd["blocks.0.attn.qkv_x.lora_B"].shape == (96, 4)
    assert sd["blocks.1.attn.proj_y.lora_B"].shape == (16, 4)
    assert set(sd) == {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")}
    assert all(not v.any() for k, v in sd.items() if k.endswith("lora_B"))
    bound = 1 / 32**0.5  # kaiming_uniform(a=√5) on fan_in 32
    a = sd["blocks.0.attn.qkv_x.lora_A"]
    assert a.abs().max() <= bound and a.std() > bound / 3
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(sd)


def test_zero_b_leaves_outputs_unchanged_and_removal_restores():
    m = model()
    ref = m(*inputs())
    add_trainable_lora(m, rank=4, alpha=16)
    torch.testing.assert_close(m(*inputs()), ref, rtol=0, atol=0)
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("lora_B"):
                p.normal_()
    assert not torch.allclose(m(*inputs()), ref)
    remove_trainable_lora(m)
    assert m(*inputs()).equal(ref) and not trainable_lora_state_dict(m)


def test_trainable_lora_matches_applied_lora():
    m = model()
    add_trainable_lora(m, rank=4, alpha=8)
    layers = random_lora(m)
    with torch.no_grad():
        for name, layer in layers.items():
            m.get_submodule(name).lora_A.copy_(layer.A)
            m.get_submodule(name).lora_B.copy_(layer.B)
    trained = m(*inputs())
    remove_trainable_lora(m)
    apply_lora(m, layers)
    torch.testing.assert_close(m(*inputs()), trained, rtol=0, atol=0)


def test_merged_equals_unmerged_and_unmerge_restores():
    m = model()
    ref = m(*inputs())
    w0 = m.blocks[0].attn.qkv_x.weight.clone()
    first, second = random_lora(m, seed=2), random_lora(m, rank=2, alpha=1, seed=3)
    h1, h2 = apply_lora(m, first, scale=0.7), apply_lora(m, second, scale=-1.3)
    unmerged = m(*inputs())
    assert (unmerged - ref).abs().max() > 1e-2
    h1.remove(), h2.remove()
    assert m(*inputs()).equal(ref)
    h1 = apply_lora(m, first, scale=0.7, merge=True)
    h2 = apply_lora(m, second, scale=-1.3, merge=True, keep_original=True)
    torch.testing.assert_close(m(*inputs()), unmerged, rtol=1e-5, atol=1e-5)
    h2.remove(), h1.remove()
    torch.testing.assert_close(m.blocks[0].attn.qkv_x.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(*inputs()), ref, rtol=1e-5, atol=1e-5)


def test_keep_original_restores_bf16_weights_bit_exactly():
    m = model().to(torch.bfloat16)
    w0 = m.blocks[1].attn.qkv_y.weight.clone()
    apply_lora(m, random_lora(m), merge=True, keep_original=True).remove()
    assert m.blocks[1].attn.qkv_y.weight.equal(w0)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 0, 1)], ids=["oldest-first", "middle", "newest"])
def test_merged_loras_with_kept_originals_come_off_bit_exactly_in_any_order(order):
    # Each removal rebuilds the weights from the one kept original and the LoRAs still merged: they equal
    # merging only those from the start, and the original once none is left (a handle restoring a copy taken
    # before later LoRAs were merged would put the earlier LoRA back).
    m = model().to(torch.bfloat16)
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    loras = [random_lora(m, seed=s) for s in (2, 3, 4)]
    scales = (0.7, -1.3, 0.4)

    def merged_alone(kept: list[int]) -> dict:
        other = model().to(torch.bfloat16)
        for i in kept:
            apply_lora(other, loras[i], scales[i], merge=True)
        return other.state_dict()

    handles = [apply_lora(m, lr, s, merge=True, keep_original=True) for lr, s in zip(loras, scales)]
    assert handles[0].originals["blocks.0.attn.qkv_x"] is handles[2].originals["blocks.0.attn.qkv_x"]
    for n, i in enumerate(order[:-1]):
        handles[i].remove()
        expected = merged_alone([j for j in range(3) if j not in order[: n + 1]])
        assert all(v.equal(expected[k]) for k, v in m.state_dict().items())
    handles[order[-1]].remove()
    assert all(v.equal(w0[k]) for k, v in m.state_dict().items())
    assert not any(hasattr(lin, "_lora_merged") for lin in target_modules(m).values())


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "1", True], ids=["nan", "inf", "str", "bool"])
@pytest.mark.parametrize("merge", [False, True], ids=["hooked", "merged"])
def test_a_scale_that_is_not_a_finite_number_is_refused_before_any_weight_changes(scale, merge):
    m = model()
    ref = m(*inputs())
    with pytest.raises(ValueError, match=r"LoRA: scale .* must be (finite|a number)"):
        apply_lora(m, random_lora(m), scale=scale, merge=merge)
    assert not any(m.blocks[i].attn.qkv_x._forward_hooks for i in range(3))
    assert m(*inputs()).equal(ref)


def test_a_merge_that_would_overflow_is_refused_and_nothing_stays_merged():
    m = model().to(torch.float16)
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv_x.*scale 100000.*infinite or NaN in float16"):
        apply_lora(m, random_lora(m), scale=1e5, merge=True)
    assert all(v.equal(w0[k]) for k, v in m.state_dict().items())


def test_a_merge_too_large_to_subtract_again_keeps_the_original():
    # At scale 1e6 the sum rounds the weight away in fp32: subtracting Δ would not give it back, so the
    # original is kept (without keep_original) and removal restores the model exactly.
    m = model()
    ref = m(*inputs())
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    handle = apply_lora(m, random_lora(m), scale=1e6, merge=True)
    assert set(handle.originals) == set(handle.layers)
    handle.remove()
    assert all(v.equal(w0[k]) for k, v in m.state_dict().items())
    assert m(*inputs()).equal(ref)
    # An ordinary scale keeps no copy (unmerging is exact to within rounding there).
    assert not apply_lora(m, random_lora(m), scale=0.7, merge=True).originals


def test_merge_refuses_fp8_and_lora_must_fit():
    from mochi.weights.fp8 import Fp8Linear

    m = model()
    layers = random_lora(m)
    lin = m.blocks[0].attn.qkv_x
    fp8 = Fp8Linear(lin.in_features, lin.out_features, bias=False, device="meta")
    m.blocks[0].attn.qkv_x = fp8
    with pytest.raises(ValueError, match="cannot merge a LoRA into quantized weights.*--fp8 dequantize"):
        apply_lora(m, layers, merge=True)
    other = DiTConfig(depth=3, num_heads=2, hidden_size_x=64, hidden_size_y=16, t5_feat_dim=24)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv_x.*trained for another model"):
        apply_lora(AsymmDiT(other), layers)
    with pytest.raises(ValueError, match="not a Linear layer"):
        apply_lora(model(), {"blocks.7.attn.qkv_x": layers["blocks.0.attn.qkv_x"]})


def test_genmo_file_round_trip_and_metadata(tmp_path):
    m = model()
    layers = random_lora(m, rank=4, alpha=8)
    path = save_lora(layers, tmp_path / "l.safetensors")
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "blocks.0.attn.qkv_x.lora_A" in keys and "blocks.1.attn.proj_y.lora_B" in keys
    # Each layer's alpha as a tensor too: ComfyUI reads only these (without them it ran this file at half
    # strength: alpha 8, rank 4), Genmo's loader ignores them (non-strict), ours reads them first.
    assert keys == {f"{n}.{k}" for n in layers for k in ("lora_A", "lora_B", "alpha")}
    with safe_open(path, "pt") as f:
        assert {f.get_tensor(f"{n}.alpha").item() for n in layers} == {8.0}
    kwargs = json.loads(meta["kwargs"])
    assert kwargs == {
        "qkv_proj_lora_rank": 4,
        "qkv_proj_lora_alpha": 8.0,
        "qkv_proj_lora_dropout": 0.0,
        "out_proj_lora_rank": 4,
        "out_proj_lora_alpha": 8.0,
        "out_proj_lora_dropout": 0.0,
    }
    back = read_lora(path)
    assert back.format == "genmo" and back.targets == ("qkv_x", "qkv_y", "proj_x", "proj_y")
    for name, layer in layers.items():
        assert back.layers[name].A.equal(layer.A) and back.layers[name].B.equal(layer.B)
        assert back.layers[name].alpha == 8.0


def test_genmo_file_folds_alphas_that_differ_within_a_group(tmp_path):
    m = model()
    layers = random_lora(m, rank=4, alpha=8)
    layers["blocks.1.attn.qkv_y"] = LoraLayer(
        layers["blocks.1.attn.qkv_y"].A, layers["blocks.1.attn.qkv_y"].B, 2.0
    )
    save_lora(layers, tmp_path / "l.safetensors")
    back = read_lora(tmp_path / "l.safetensors").layers
    assert json.loads(read_metadata(tmp_path / "l.safetensors")["kwargs"])["qkv_proj_lora_alpha"] == 8.0
    assert back["blocks.1.attn.qkv_y"].alpha == 8.0
    assert load_file(tmp_path / "l.safetensors")["blocks.1.attn.qkv_y.alpha"].item() == 8.0  # what B folds
    for name, layer in layers.items():
        torch.testing.assert_close(back[name].delta_weight(), layer.delta_weight(), rtol=1e-6, atol=1e-6)


def test_genmo_file_without_metadata_has_scaling_one(tmp_path):
    layers = random_lora(model(), rank=4)
    save_file({f"{n}.lora_{ab}": getattr(v, ab) for n, v in layers.items() for ab in "AB"}, tmp_path / "x.st")
    (tmp_path / "x.st").rename(tmp_path / "x.safetensors")
    assert {v.alpha for v in read_lora(tmp_path / "x.safetensors").layers.values()} == {4.0}


def test_diffusers_keys_split_qkv_and_fold_scaling():
    m = model()
    layers = random_lora(m, rank=4, alpha=8)
    sd = to_diffusers(layers)
    a = sd["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert a.equal(sd["transformer.transformer_blocks.0.attn1.to_v.lora_A.weight"])
    b = layers["blocks.0.attn.qkv_x"].B
    torch.testing.assert_close(sd["transformer.transformer_blocks.0.attn1.to_k.lora_B.weight"], 2 * b[32:64])
    assert "transformer.transformer_blocks.1.attn1.to_add_out.lora_B.weight" in sd
    assert "transformer.transformer_blocks.1.attn1.add_v_proj.lora_A.weight" in sd
    assert not any("transformer_blocks.2.attn1.to_add_out" in k for k in sd)
    assert len(sd) == 2 * (3 * 3 * 2 + 3 + 2)


def test_unequal_qkv_factors_fuse_to_triple_rank():
    g = torch.Generator().manual_seed(0)
    parts = {
        f"transformer_blocks.0.attn1.to_{n}": LoraLayer(
            torch.randn(r, 32, generator=g), torch.randn(32, r, generator=g), alpha
        )
        for n, r, alpha in (("q", 2, 4.0), ("k", 3, 3.0), ("v", 1, 0.5))
    }
    fused = from_diffusers(parts)["blocks.0.attn.qkv_x"]
    assert fused.rank == 6 and fused.scaling == 1.0
    expected = torch.cat([p.delta_weight() for p in parts.values()])
    torch.testing.assert_close(fused.delta_weight(), expected, rtol=1e-5, atol=1e-5)
    shared = torch.randn(2, 32, generator=g)
    same_a = {k: LoraLayer(shared, torch.randn(32, 2, generator=g), 2.0) for k in parts}
    fused = from_diffusers(same_a)["blocks.0.attn.qkv_x"]
    assert fused.rank == 2 and fused.A.equal(shared)
    assert fused.B.equal(torch.cat([v.B for v in same_a.values()]))
    # to_q and to_v only (PEFT's usual target_modules): refused ("covers only"); the missing k adds nothing.
    q, v = (parts[f"transformer_blocks.0.attn1.to_{n}"] for n in ("q", "v"))
    fused = from_diffusers({"transformer_blocks.0.attn1.to_q": q, "transformer_blocks.0.attn1.to_v": v})
    expected = torch.cat([q.delta_weight(), torch.zeros(32, 32), v.delta_weight()])
    torch.testing.assert_close(fused["blocks.0.attn.qkv_x"].delta_weight(), expected, rtol=1e-5, atol=1e-5)
    one = {k: LoraLayer(shared, torch.randn(32, 2, generator=g), 2.0) for k in list(parts)[:2]}
    fused = from_diffusers(one)["blocks.0.attn.qkv_x"]  # one A and alpha: fused exactly at rank 2
    assert fused.rank == 2 and fused.B.equal(torch.cat([*(x.B for x in one.values()), torch.zeros(32, 2)]))


def test_convert_round_trip_and_unequal_a_file(tmp_path):
    m = model()
    layers = random_lora(m, rank=4, alpha=4)
    save_lora(layers, tmp_path / "g.safetensors")
    dst, read = convert_lora(tmp_path / "g.safetensors", tmp_path / "d.safetensors", "diffusers")
    assert read.format == "genmo" and read_lora(dst).format == "diffusers"
    back, _ = convert_lora(dst, tmp_path / "g2.safetensors", "genmo")
    again = read_lora(back)
    for name, layer in layers.items():
        assert again.layers[name].A.equal(layer.A) and again.layers[name].B.equal(layer.B)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        convert_lora(dst, tmp_path / "g2.safetensors", "genmo")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        convert_lora(dst, tmp_path / "g2.pt", "genmo")


ALL_TARGETS = tuple(BLOCK_LINEARS)


def _round_trip(layers: dict, tmp_path) -> tuple[set, dict]:
    """``layers`` in Genmo's format, converted to diffusers and back: the diffusers keys, the layers read."""
    save_lora(layers, tmp_path / "g.safetensors")
    dst, _ = convert_lora(tmp_path / "g.safetensors", tmp_path / "d.safetensors", "diffusers")
    with safe_open(dst, "pt") as f:
        keys = set(f.keys())
    back, _ = convert_lora(dst, tmp_path / "g2.safetensors", "genmo")
    return keys, read_lora(back).layers


@pytest.mark.parametrize(
    "blocks",
    [(0, 1, 2), (0, 1), (0,), (1,), (2,), (1, 2)],
    ids=["all", "not-last", "first", "middle", "last", "last-two"],
)
def test_convert_round_trip_of_any_blocks_is_exact(tmp_path, blocks):
    """A LoRA that leaves out the last block (train-lora --targets proj_y has no layer there) keeps the
    names and values of every layer through diffusers' format and back (alpha = rank: nothing to fold)."""
    layers = {
        n: v
        for n, v in random_lora(model(), rank=4, alpha=4, targets=ALL_TARGETS).items()
        if int(n.split(".")[1]) in blocks
    }
    keys, back = _round_trip(layers, tmp_path)
    assert back.keys() == layers.keys()
    for name, layer in layers.items():
        assert back[name].A.equal(layer.A) and back[name].B.equal(layer.B) and back[name].alpha == 4.0
    context = {k.split(".")[2]: k.split(".")[4] for k in keys if ".norm1_context." in k}
    assert context == {str(i): "linear_1" if i == CFG.depth - 1 else "linear" for i in blocks}


def test_proj_y_lora_converts_to_diffusers_names(tmp_path):
    """What train-lora --targets proj_y writes (blocks 0..depth-2) converts; it once failed with 'has no
    diffusers equivalent', block depth-2 being taken for the last."""
    layers = random_lora(model(), targets=("proj_y", "mlp_y.w1"))
    sd = to_diffusers(layers)
    assert {k.split(".")[2] for k in sd} == {"0", "1"} and len(sd) == 2 * 2 * 2
    assert "transformer.transformer_blocks.1.attn1.to_add_out.lora_B.weight" in sd
    assert "transformer.transformer_blocks.1.ff_context.net.0.proj.lora_A.weight" in sd


def test_mod_y_lora_of_one_block_keeps_its_diffusers_name(tmp_path):
    """A PEFT LoRA on block 0's norm1_context.linear, to Genmo's format and back, is norm1_context.linear
    again (it once came back as linear_1, block 0 being the highest index present)."""
    g = torch.Generator().manual_seed(0)
    peft = {
        "transformer.transformer_blocks.0.norm1_context.linear.lora_A.weight": torch.randn(
            4, 32, generator=g
        ),
        "transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight": torch.randn(
            64, 4, generator=g
        ),
    }
    save_file(peft, tmp_path / "peft.safetensors")
    genmo, _ = convert_lora(tmp_path / "peft.safetensors", tmp_path / "g.safetensors", "genmo")
    back, _ = convert_lora(genmo, tmp_path / "d.safetensors", "diffusers")
    with safe_open(back, "pt") as f:
        assert set(f.keys()) == set(peft)
        assert all(f.get_tensor(k).equal(v) for k, v in peft.items())


def test_mod_y_of_an_unknown_width_needs_its_shapes_or_the_depth():
    """mod_y's B has 4·hidden_y rows except in the last block (hidden_y): the LoRA's text-stream layers
    tell hidden_y; a mod_y-only LoRA of an unknown width needs the depth, which must then fit the shapes."""
    cfg = DiTConfig(
        depth=3, num_heads=2, hidden_size_x=48, hidden_size_y=24, t5_feat_dim=24, mlp_multiple_of=1
    )
    with torch.device("meta"):
        m = AsymmDiT(cfg)
    layers = {}
    g = torch.Generator().manual_seed(0)
    for name, lin in target_modules(m, ("mod_y", "qkv_y")).items():
        layers[name] = LoraLayer(
            torch.randn(4, lin.in_features, generator=g), torch.randn(lin.out_features, 4, generator=g), 4.0
        )
    mod_y = {n: v for n, v in layers.items() if n.endswith("mod_y")}
    first = {"blocks.0.mod_y": mod_y["blocks.0.mod_y"]}
    last = {"blocks.2.mod_y": mod_y["blocks.2.mod_y"]}
    names = {k.split(".")[2]: k.split(".")[4] for k in to_diffusers(mod_y) if ".norm1_context." in k}
    assert names == {"0": "linear", "1": "linear", "2": "linear_1"}  # two row counts tell
    qkv_y = {n: v for n, v in layers.items() if n.endswith("qkv_y")}
    assert "transformer.transformer_blocks.2.norm1_context.linear_1.lora_A.weight" in to_diffusers(
        last | qkv_y
    )
    for one in (first, last):
        with pytest.raises(WeightsError, match="cannot tell whether LoRA layer .* give the DiT's depth"):
            to_diffusers(one)
    assert "transformer.transformer_blocks.0.norm1_context.linear.lora_A.weight" in to_diffusers(
        first, depth=3
    )
    assert "transformer.transformer_blocks.2.norm1_context.linear_1.lora_B.weight" in to_diffusers(
        last, depth=3
    )
    with pytest.raises(WeightsError, match="shape of mod_y in a block but the last, but block 0 is the last"):
        to_diffusers(mod_y, depth=1)
    with pytest.raises(WeightsError, match="is in block 2, but a DiT of depth 2 has blocks 0 to 1"):
        to_diffusers(last, depth=2)
    with pytest.raises(WeightsError, match="last block of a DiT of depth 1, which has no attn.proj_y"):
        to_diffusers(random_lora(model(), targets=("proj_y",)), depth=1)
    with pytest.raises(ValueError, match="DiT depth 0 must be a positive number of blocks"):
        to_diffusers(first, depth=0)


def test_read_lora_rejects_foreign_files(tmp_path):
    save_file({"blocks.0.attn.qkv_x.weight": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="not a Mochi DiT LoRA"):
        read_lora(tmp_path / "w.safetensors")


def test_diffusers_peft_loading_gives_our_outputs(tmp_path):
    """Our Genmo-format LoRA, converted, loaded by diffusers (peft) into MochiTransformer3DModel."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from mochi.weights.keymaps.dit_diffusers import diffusers_model

    m = model()
    theirs = diffusers_model(m)
    layers = random_lora(m, rank=4, alpha=8)
    save_lora(layers, tmp_path / "genmo.safetensors")
    dst, _ = convert_lora(tmp_path / "genmo.safetensors", tmp_path / "peft.safetensors", "diffusers")
    theirs.load_lora_adapter(str(dst), prefix="transformer", adapter_name="star")
    apply_lora(m, read_lora(tmp_path / "genmo.safetensors").layers)
    x, sigma, text, mask = inputs()
    with torch.no_grad():
        ours = m(x, sigma, text, mask)
        ref = theirs(x, text, (1 - sigma) * 1000, mask, return_dict=False)[0]
        base = model()(x, sigma, text, mask)
    assert (ours - base).abs().max() > 0.1 * ours.abs().max()  # the LoRA matters
    assert (ours - ref).abs().max() <= 1e-4 * ours.abs().max()
    # A weaker LoRA scale in diffusers matches our scale.
    theirs.set_adapters(["star"], weights=[0.5])
    m2 = model()
    apply_lora(m2, read_lora(tmp_path / "genmo.safetensors").layers, scale=0.5)
    with torch.no_grad():
        torch.testing.assert_close(
            m2(x, sigma, text, mask), theirs(x, text, (1 - sigma) * 1000, mask, return_dict=False)[0],
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


def test_released_size_lora_keys_match_genmo():
    """§6.1: rank 16 on qkv_x, qkv_y, proj_x, proj_y of the 48 blocks (no proj_y in block 47): 25.9 M."""
    from mochi.models.dit import DIT_PRESETS

    with torch.device("meta"):
        m = AsymmDiT(DIT_PRESETS["mochi-1-preview"])
    add_trainable_lora(m, rank=16, alpha=16)
    sd = trainable_lora_state_dict(m)
    assert len(sd) == 2 * (48 * 3 + 47)
    assert sum(v.numel() for v in sd.values()) == 25_878_528
    assert sd["blocks.46.attn.proj_y.lora_A"].shape == (16, 3072)
    assert sd["blocks.46.attn.proj_y.lora_B"].shape == (1536, 16)
    assert sd["blocks.47.attn.qkv_y.lora_B"].shape == (9216, 16)
    assert "blocks.47.attn.proj_y.lora_A" not in sd


def _peft_folder(tmp_path, alpha: float):  # noqa: ANN202
    """A PEFT folder: one rank-4 LoRA on block 0's to_out.0 and adapter_config.json's lora_alpha."""
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    sd = {
        f"base_model.model.transformer_blocks.0.attn1.to_out.0.lora_{k}.weight": v
        for k, v in (("A", a), ("B", b))
    }
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": alpha}))
    return folder, sd, a, b


def test_peft_alpha_sources(tmp_path):
    """Alpha of a diffusers/PEFT file: .alpha keys, adapter_config.json, diffusers' header metadata."""
    folder, sd, a, b = _peft_folder(tmp_path, 2)
    layer = read_lora(folder).layers["blocks.0.attn.proj_x"]
    assert layer.alpha == 2.0 and layer.A.equal(a) and layer.B.equal(b)
    kohya = {**sd, "transformer_blocks.0.attn1.to_out.0.alpha": torch.tensor(1.0)}
    save_file(kohya, tmp_path / "k.safetensors")
    assert read_lora(tmp_path / "k.safetensors").layers["blocks.0.attn.proj_x"].alpha == 1.0
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    save_file(sd, tmp_path / "d.safetensors", metadata=meta)
    assert read_lora(tmp_path / "d.safetensors").layers["blocks.0.attn.proj_x"].alpha == 8.0
    save_file(sd, tmp_path / "plain.safetensors")
    assert read_lora(tmp_path / "plain.safetensors").layers["blocks.0.attn.proj_x"].alpha == 4.0


def test_a_diffusers_lora_written_beside_a_peft_config_is_not_scaled_again(tmp_path):
    """convert-lora --to diffusers into a PEFT folder wrote pytorch_lora_weights.safetensors (scaling folded
    into B, no alpha) beside adapter_config.json, whose lora_alpha the reader then applied a second time (4x
    here)."""
    from mochi.cli import main

    folder = _peft_folder(tmp_path, 16)[0]
    source = read_lora(folder).layers["blocks.0.attn.proj_x"]
    assert main(["convert-lora", str(folder), str(folder), "--to", "diffusers"]) == 0
    written = read_lora(folder / "pytorch_lora_weights.safetensors").layers["blocks.0.attn.proj_x"]
    delta = (source.B @ source.A) * source.alpha / 4
    assert torch.allclose((written.B @ written.A) * written.alpha / written.rank, delta, rtol=1e-6, atol=1e-6)


def test_peft_alpha_pattern_and_rslora_give_peft_s_scaling(tmp_path):
    r"""alpha_pattern keys matched as name suffixes ('proj' gave add_q_proj, add_k_proj and add_v_proj the
    alpha meant for ff.net.0.proj; a regular expression such as r'.*\.to_out\.0' matched nothing), and
    use_rslora (scaling alpha/√r) was ignored: scalings other than peft's, as read here from peft itself."""
    from peft.utils.other import get_pattern_key

    mods = {"attn1.add_q_proj": (16, 32), "attn1.add_k_proj": (16, 32), "attn1.add_v_proj": (16, 32)}
    mods |= {"ff.net.0.proj": (32, 64), "attn1.to_out.0": (32, 32)}
    sd = {}
    for mod, (i, o) in mods.items():
        sd[f"base_model.model.transformer_blocks.0.{mod}.lora_A.weight"] = torch.randn(4, i)
        sd[f"base_model.model.transformer_blocks.0.{mod}.lora_B.weight"] = torch.randn(o, 4)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(sd, folder / "adapter_model.safetensors")
    pattern = {"proj": 8, r".*\.to_out\.0": 2}
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": pattern}))
    for name, layer in read_lora(folder).stored.items():
        assert layer.alpha == pattern.get(get_pattern_key(pattern, name), 4), name
    assert read_lora(folder).stored["transformer_blocks.0.attn1.add_q_proj"].alpha == 4
    config.write_text(json.dumps({"r": 4, "lora_alpha": 4, "use_rslora": True}))
    assert {layer.scaling for layer in read_lora(folder).stored.values()} == {4 / math.sqrt(4)}
    config.write_text(json.dumps({"lora_alpha": 4, "alpha_pattern": {"(": 8}}))
    with pytest.raises(WeightsError, match=r"'alpha_pattern' has key '\(', which is not a regular"):
        read_lora(folder)


# -- malformed files: one WeightsError naming the file, the field and the rule -------------------------------

GENMO_SD = {
    "blocks.0.attn.qkv_x.lora_A": torch.randn(4, 32),
    "blocks.0.attn.qkv_x.lora_B": torch.randn(96, 4),
}
PEFT_SD = {
    "transformer.transformer_blocks.0.attn1.to_out.0.lora_A.weight": torch.randn(4, 32),
    "transformer.transformer_blocks.0.attn1.to_out.0.lora_B.weight": torch.randn(32, 4),
}


@pytest.mark.parametrize(
    ("sd", "metadata", "match"),
    [
        (
            GENMO_SD,
            {"mochi_lora": "null"},
            r"bad\.safetensors': metadata 'mochi_lora' holds null, not a JSON object",
        ),
        (
            GENMO_SD,
            {"kwargs": "[1,2]"},
            r"bad\.safetensors': metadata 'kwargs' holds \[1, 2\], not a JSON object",
        ),
        (
            GENMO_SD,
            {"kwargs": "{oops"},
            r"bad\.safetensors': metadata 'kwargs' is not valid JSON .*JSON object",
        ),
        (
            GENMO_SD,
            {"kwargs": json.dumps({"qkv_proj_lora_alpha": "abc"})},
            r"bad\.safetensors': metadata 'kwargs' field 'qkv_proj_lora_alpha' is 'abc'; a LoRA alpha must",
        ),
        (
            GENMO_SD,
            {"mochi_lora": json.dumps({"alpha": [8]})},
            r"metadata 'mochi_lora' field 'alpha' is \[8\]; it must be a JSON object of layer name → alpha",
        ),
        (
            GENMO_SD,
            {"mochi_lora": json.dumps({"alpha": {"qkv_x": None}})},
            r"metadata 'mochi_lora' field 'alpha'\['qkv_x'\] is None; a LoRA alpha must be a number",
        ),
        (
            PEFT_SD,
            {"lora_adapter_metadata": "[]"},
            r"bad\.safetensors': metadata 'lora_adapter_metadata' holds \[\], not a JSON object",
        ),
        (
            PEFT_SD,
            {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "abc"})},
            r"metadata 'lora_adapter_metadata' field 'lora_alpha' is 'abc'; a LoRA alpha must be a number",
        ),
    ],
    ids=[
        "mochi_lora-null",
        "kwargs-list",
        "kwargs-bad-json",
        "kwargs-alpha-abc",
        "alpha-list",
        "alpha-null",
        "peft-metadata-list",
        "peft-alpha-abc",
    ],
)
def test_read_lora_names_bad_metadata(tmp_path, sd, metadata, match):
    save_file(sd, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(WeightsError, match=match):
        read_lora(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=match):  # convert-lora reads the same way
        convert_lora(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", "diffusers")
    assert not (tmp_path / "out.safetensors").exists()


def test_read_lora_accepts_alpha_written_as_a_string(tmp_path):
    save_file(
        GENMO_SD, tmp_path / "s.safetensors", metadata={"mochi_lora": json.dumps({"alpha": {"qkv_x": "8"}})}
    )
    assert read_lora(tmp_path / "s.safetensors").layers["blocks.0.attn.qkv_x"].alpha == 8.0


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("{oops", r"PEFT config '.*adapter_config\.json' is not valid JSON .*; it must be a JSON object"),
        ("[1]", r"PEFT config '.*adapter_config\.json' holds \[1\], not a JSON object"),
        (
            '{"lora_alpha": "abc"}',
            r"adapter_config\.json' field 'lora_alpha' is 'abc'; a LoRA alpha must be a number",
        ),
        (
            '{"alpha_pattern": [2]}',
            r"adapter_config\.json' field 'alpha_pattern' is \[2\]; it must be a JSON object",
        ),
    ],
    ids=["bad-json", "list", "alpha-abc", "pattern-list"],
)
def test_read_lora_names_bad_adapter_config(tmp_path, config, match):
    save_file(PEFT_SD, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(WeightsError, match=match):
        read_lora(tmp_path)


@pytest.mark.parametrize("alpha", [torch.tensor([1.0, 2.0]), torch.zeros(0)], ids=["two", "empty"])
def test_read_lora_rejects_alpha_tensor_not_one_value(tmp_path, alpha):
    save_file({**GENMO_SD, "blocks.0.attn.qkv_x.alpha": alpha}, tmp_path / "a.safetensors")
    with pytest.raises(
        WeightsError,
        match=rf"a\.safetensors': 'blocks\.0\.attn\.qkv_x\.alpha' holds {alpha.numel()} values .*one number",
    ):
        read_lora(tmp_path / "a.safetensors")


def test_read_lora_refuses_an_alpha_without_its_factors(tmp_path):
    """An alpha whose layer has no A and B (a cut file, or factors under other names) was ignored."""
    stray = {"blocks.0.attn.qkv_y.alpha": torch.tensor(4.0), "blocks.1.attn.proj_x.alpha": torch.tensor(2.0)}
    save_file({**GENMO_SD, **stray}, tmp_path / "a.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"a\.safetensors': alpha for 2 layers without A and B \(blocks\.0\.attn\.qkv_y, "
        r"blocks\.1\.attn\.proj_x\); every \.alpha key goes with the lora_A and lora_B of its layer",
    ):
        read_lora(tmp_path / "a.safetensors")


def test_read_lora_refuses_integer_factors_and_two_names_for_one_tensor(tmp_path):
    a, b = torch.randn(4, 32), torch.randn(96, 4)
    save_file(
        {"blocks.0.attn.qkv_x.lora_A": a.to(torch.int32), "blocks.0.attn.qkv_x.lora_B": b}, tmp_path / "i.st"
    )
    with pytest.raises(
        WeightsError, match=r"'blocks.0.attn.qkv_x.lora_A' is int32; LoRA factors are floating"
    ):
        read_lora(tmp_path / "i.st")
    both = {"blocks.0.attn.qkv_x.lora_A": a, "blocks.0.attn.qkv_x.lora_B": b}
    both.update({"dit." + k: torch.zeros_like(v) for k, v in both.items()})  # one layer under two prefixes
    save_file(both, tmp_path / "d.st")
    with pytest.raises(WeightsError, match=r"two names for one tensor \('blocks.0.attn.qkv_x.lora_A'\)"):
        read_lora(tmp_path / "d.st")


def test_rank_zero_lora_is_refused(tmp_path):
    save_file(
        {"blocks.0.attn.qkv_x.lora_A": torch.zeros(0, 32), "blocks.0.attn.qkv_x.lora_B": torch.zeros(96, 0)},
        tmp_path / "r0.safetensors",
    )
    with pytest.raises(
        WeightsError, match=r"r0\.safetensors': LoRA layer 'blocks\.0\.attn\.qkv_x' has rank 0"
    ):
        read_lora(tmp_path / "r0.safetensors")
    with pytest.raises(ValueError, match=r"LoRA layer 'blocks\.0\.attn\.qkv_x' has rank 0 .*rank 1 or more"):
        apply_lora(model(), {"blocks.0.attn.qkv_x": LoraLayer(torch.zeros(0, 32), torch.zeros(96, 0), 1.0)})


def test_merging_into_weights_sharded_over_ranks_names_the_sharding():
    class DTensor(torch.nn.Parameter):  # what FSDP2 leaves as a Linear's weight: its type name is the test
        pass

    dit = model()
    layer = dit.get_submodule("blocks.0.attn.qkv_x")
    layer.weight = DTensor(layer.weight.data, requires_grad=False)
    lora = {"blocks.0.attn.qkv_x": LoraLayer(torch.ones(2, 32), torch.ones(96, 2), 2.0)}
    with pytest.raises(
        ValueError, match=r"sharded over ranks \(blocks\.0\.attn\.qkv_x …, --parallel-weights shard\)"
    ):
        apply_lora(dit, lora, merge=True)
    apply_lora(dit, lora, merge=False).remove()  # unmerged it applies


def test_a_read_lora_does_not_change_when_its_file_is_written_over(tmp_path):
    """read_lora's tensors were views of the file's memory map: a LoRA applied unmerged and its file then
    written over in place (cp onto it) changed the next video, and a file cut short killed the process
    with SIGBUS at the next forward."""
    layers = random_lora(model())
    path = save_lora(layers, tmp_path / "l.safetensors")
    read = read_lora(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the same length, every byte after the header's first 8 zeroed
        f.seek(8)
        f.write(bytes(size - 8))
    for name, layer in layers.items():
        assert read.layers[name].A.equal(layer.A) and read.layers[name].B.equal(layer.B), name


def test_a_run_folder_given_as_a_lora_names_its_files_and_the_result(tmp_path):
    """`--lora RUN` (a train-lora folder) said only "holds 4 .safetensors files; name the LoRA file"."""
    for name in ("lora-step-000002.safetensors", "lora-step-000004.safetensors", "lora.safetensors"):
        save_lora(random_lora(model()), tmp_path / name)
    with pytest.raises(
        WeightsError,
        match=r"holds 3 \.safetensors files \(lora-step-000002\.safetensors, lora-step-000004\.safetensors, "
        rf"lora\.safetensors\); name the LoRA file, e\.g\. '{tmp_path}/lora\.safetensors'",
    ):
        read_lora(tmp_path)


def test_a_diffusers_lora_with_alpha_metadata_converts_to_genmo_exactly(tmp_path):
    """q, k and v sharing A and alpha (a PEFT trainer's file, alpha in diffusers' header) were fused with
    alpha/r folded into B: rounded factors, and a merged delta other than peft's, for alpha/r not a power
    of two. Now B is concatenated and alpha kept: Genmo's file holds the file's own factors."""
    layers = random_lora(model(), rank=4, alpha=4)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 6})}
    save_file(to_diffusers(layers), tmp_path / "d.safetensors", metadata=meta)
    dst, _ = convert_lora(tmp_path / "d.safetensors", tmp_path / "g.safetensors", "genmo")
    back = read_lora(dst).layers
    assert back.keys() == layers.keys()
    for name, layer in layers.items():
        assert back[name].A.equal(layer.A) and back[name].B.equal(layer.B) and back[name].alpha == 6.0, name


def test_a_missing_lora_is_named_as_a_lora(tmp_path, capsys):
    """convert-lora and read_lora called a missing LoRA file a "checkpoint"."""
    from mochi.cli import main

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match=rf"^LoRA '{missing}' does not exist$"):
        read_lora(missing)
    assert main(["convert-lora", str(missing), str(tmp_path / "out.safetensors"), "--to", "diffusers"]) == 2
    assert capsys.readouterr().err == f"mochi: error: LoRA '{missing}' does not exist\n"
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_lora_takes_an_upper_case_suffix_and_names_a_gguf_as_a_model(tmp_path):
    """OUT.SAFETENSORS was refused as not ending in .safetensors (convert takes it); a .gguf source was
    "damaged, truncated or of another format"."""
    layers = random_lora(model(), rank=2, alpha=2)
    save_lora(layers, tmp_path / "g.safetensors")
    dst, _ = convert_lora(tmp_path / "g.safetensors", tmp_path / "D.SAFETENSORS", "diffusers")
    assert read_lora(dst).format == "diffusers"
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(WeightsError, match=r"is a GGUF file, a quantized model .*; a LoRA is a .safetensors"):
        convert_lora(tmp_path / "m.gguf", tmp_path / "x.safetensors", "genmo")


_Q = "transformer.transformer_blocks.0.attn1.to_"


@pytest.mark.parametrize(
    "tensors, to, message",
    [
        (  # q and k read inputs of other widths: torch.cat's RuntimeError, a traceback
            {f"{_Q}q.lora_A.weight": (2, 8), f"{_Q}q.lora_B.weight": (8, 2)}
            | {f"{_Q}k.lora_A.weight": (2, 12), f"{_Q}k.lora_B.weight": (8, 2)},
            "genmo",
            "attn1.to_k (in 12, out 8), transformer_blocks.0.attn1.to_q (in 8, out 8) adapt the q, k and v",
        ),
        (  # q and k of other output widths: fused into a qkv_x of 22 rows, written
            {f"{_Q}q.lora_A.weight": (2, 8), f"{_Q}q.lora_B.weight": (8, 2)}
            | {f"{_Q}k.lora_A.weight": (2, 8), f"{_Q}k.lora_B.weight": (6, 2)},
            "genmo",
            "attn1.to_k (in 8, out 6), transformer_blocks.0.attn1.to_q (in 8, out 8) adapt the q, k and v",
        ),
        (  # chunk(3) of 4 rows gave two parts: to_v was dropped, to_q and to_k written 2 rows each
            {"blocks.0.attn.qkv_x.lora_A": (2, 8), "blocks.0.attn.qkv_x.lora_B": (4, 2)},
            "diffusers",
            "'blocks.0.attn.qkv_x' has B with 4 rows; its layer outputs q, k and v stacked, so B's rows must "
            "be a multiple of 3",
        ),
        (  # SwiGLU's halves swapped at an odd row count: rows moved across the halves, written
            {"blocks.0.mlp_x.w1.lora_A": (2, 8), "blocks.0.mlp_x.w1.lora_B": (5, 2)},
            "diffusers",
            "'blocks.0.mlp_x.w1' has B with 5 rows; its layer outputs two halves that Genmo and diffusers "
            "store swapped, so B's rows must be a multiple of 2",
        ),
        (
            {
                "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": (2, 8),
                "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight": (5, 2),
            },
            "genmo",
            "'transformer_blocks.0.ff.net.0.proj' has B with 5 rows; its layer outputs two halves",
        ),
        (  # Genmo to Genmo: copied unchecked, the shape refused only later by generate
            {"blocks.0.attn.qkv_x.lora_A": (2, 8), "blocks.0.attn.qkv_x.lora_B": (4, 2)},
            "genmo",
            "'blocks.0.attn.qkv_x' has B with 4 rows; its layer outputs q, k and v stacked",
        ),
        (
            {"blocks.0.mlp_x.w1.lora_A": (2, 8), "blocks.0.mlp_x.w1.lora_B": (5, 2)},
            "genmo",
            "'blocks.0.mlp_x.w1' has B with 5 rows; its layer outputs two halves",
        ),
    ],
    ids=[
        "qkv-inputs",
        "qkv-outputs",
        "qkv-rows",
        "swap-rows",
        "swap-rows-diffusers",
        "qkv-rows-genmo",
        "swap-rows-genmo",
    ],
)
def test_a_lora_whose_shapes_no_mochi_layer_has_is_one_line_and_not_converted(
    tmp_path, capsys, tensors, to, message
):
    from mochi.cli import main

    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(*s, generator=g) for k, s in tensors.items()}, tmp_path / "l.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["convert-lora", str(tmp_path / "l.safetensors"), str(out), "--to", to]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mochi: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]


def test_a_genmo_lora_whose_group_has_alpha_0_converts(tmp_path, capsys):
    """A group's first alpha of 0 beside another alpha divided by 0 (ZeroDivisionError, a traceback)."""
    from mochi.cli import main

    g = torch.Generator().manual_seed(0)
    sd = {}
    for target, alpha in (("qkv_x", 0.0), ("qkv_y", 2.0)):
        sd[f"blocks.0.attn.{target}.lora_A"] = torch.randn(2, 8, generator=g)
        sd[f"blocks.0.attn.{target}.lora_B"] = torch.randn(6, 2, generator=g)
        sd[f"blocks.0.attn.{target}.alpha"] = torch.tensor(alpha)
    save_file(sd, tmp_path / "l.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["convert-lora", str(tmp_path / "l.safetensors"), str(out), "--to", "genmo"]) == 0
    before, after = read_lora(tmp_path / "l.safetensors").layers, read_lora(out).layers
    for name, layer in before.items():  # the same deltas: qkv_x's is 0
        delta = (after[name].B @ after[name].A) * after[name].scaling
        torch.testing.assert_close(delta, (layer.B @ layer.A) * layer.scaling)
    assert {layer.alpha for layer in after.values()} == {2.0}


@pytest.mark.parametrize(
    "tensors, message",
    [
        (  # a diverged run's LoRA
            {
                "blocks.0.attn.qkv_x.lora_A": torch.full((2, 8), math.nan),
                "blocks.0.attn.qkv_x.lora_B": (6, 2),
            },
            "holds NaN or infinite values in 1 of 2 tensors (blocks.0.attn.qkv_x.lora_A)",
        ),
        (
            {"blocks.0.attn.qkv_x.lora_A": (2, 8, 1), "blocks.0.attn.qkv_x.lora_B": (6, 2)},
            "has A (2, 8, 1) and B (6, 2); need A (r, in) and B (out, r)",
        ),
        (
            {f"{_Q}q.lora_A.weight": (2, 8), f"{_Q}q.lora_B.weight": (8, 2)}
            | {f"{_Q}k.lora_A.weight": (2, 12), f"{_Q}k.lora_B.weight": (8, 2)},
            "adapt the q, k and v of one Linear of Mochi's DiT",
        ),
    ],
    ids=["nan", "shape", "qkv"],
)
def test_info_on_a_lora_it_cannot_use_says_why(tmp_path, capsys, tensors, message):
    """info said "no Mochi component recognised in ... (keys: ...lora_A, ...lora_B)": the model's error, for a
    file that is a LoRA, while generate and convert-lora named what is wrong with it."""
    from mochi.cli import main

    g = torch.Generator().manual_seed(0)
    sd = {k: v if isinstance(v, torch.Tensor) else torch.randn(*v, generator=g) for k, v in tensors.items()}
    save_file(sd, tmp_path / "l.safetensors")
    assert main(["info", str(tmp_path / "l.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"mochi: error: {str(tmp_path / 'l.safetensors')!r} is a LoRA that cannot be used: "
    )
    assert err.count("\n") == 1 and message in err and "no Mochi component" not in err, err

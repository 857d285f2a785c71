import json

import pytest
import torch

from mochi.models.t5 import T5_PRESETS, T5Config, T5Encoder, relative_position_bucket
from mochi.weights.io import WeightsError, save_state_dict
from mochi.weights.t5 import infer_t5_config, load_t5

CONFIG = T5_PRESETS["t5-tiny"]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    torch.manual_seed(1)
    return T5EncoderModel(HFConfig(**CONFIG.to_hf())).eval()


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_hf")
    hf_model.save_pretrained(folder, max_shard_size="20KB")  # sharded, with model.safetensors.index.json
    return folder


def inputs(length=40):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[1, 17:] = False
    mask[2, 2:] = False
    return ids, mask


def reference(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def encoder_sd(hf_model):
    return {k: v.clone() for k, v in hf_model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def test_parity_with_transformers_from_sharded_folder(hf_model, hf_folder):
    assert (hf_folder / "model.safetensors.index.json").exists()
    model = load_t5(hf_folder)
    assert model.config == CONFIG
    assert next(model.parameters()).dtype == torch.float32
    ids, mask = inputs(length=200)  # beyond max_distance=128: exercises the log buckets and their clamp
    with torch.no_grad():
        ours = model(ids, mask)
        torch.testing.assert_close(ours, reference(hf_model, ids, mask), rtol=0, atol=1e-5)
        unmasked = hf_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model(ids), unmasked, rtol=0, atol=1e-5)


def test_state_dict_keys_are_hf_names(hf_model):
    ours = T5Encoder(CONFIG).state_dict()
    theirs = hf_model.state_dict()
    # HF's encoder.embed_tokens.weight is a tied alias of shared.weight that save_pretrained leaves out.
    assert set(ours) == set(theirs) - {"encoder.embed_tokens.weight"}
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_xxl_preset_keys_and_parameter_count():
    with torch.device("meta"):
        model = T5Encoder(T5_PRESETS["t5-v1_1-xxl"])
    sd = model.state_dict()
    assert sum(v.numel() for v in sd.values()) == 4_762_310_656
    assert len(sd) == 2 + 1 + 24 * 9
    assert sd["shared.weight"].shape == (32128, 4096)
    assert sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 64)
    assert sd["encoder.block.23.layer.1.DenseReluDense.wi_0.weight"].shape == (10240, 4096)
    assert sd["encoder.block.23.layer.1.DenseReluDense.wo.weight"].shape == (4096, 10240)
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in sd
    assert infer_t5_config(sd) == T5_PRESETS["t5-v1_1-xxl"]


def test_relative_position_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None, :]
    for buckets, distance in [(32, 128), (16, 40)]:
        want = T5Attention._relative_position_bucket(rel, True, buckets, distance)
        assert torch.equal(relative_position_bucket(rel, buckets, distance), want)


def test_comfyui_fp16_single_file(hf_model, tmp_path):
    sd = {k: v.half() for k, v in encoder_sd(hf_model).items()}
    save_state_dict(sd, tmp_path / "t5xxl_fp16.safetensors")
    model = load_t5(tmp_path / "t5xxl_fp16.safetensors")
    assert model.config == CONFIG  # inferred from shapes
    assert torch.equal(model.shared.weight, sd["shared.weight"].float())
    ids, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), reference(hf_model, ids, mask), rtol=0, atol=2e-2)


def quantize_fp8(sd, layout):
    """ComfyUI's scaled-fp8 layout: Linear weights as float8_e4m3fn with a 0-d float32 scale."""
    out = {}
    for key, value in sd.items():
        if key.endswith(
            ("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")
        ):
            layer = key.removesuffix(".weight")
            scale = value.abs().max() / 448.0
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            if layout == "legacy":
                out[f"{layer}.scale_weight"] = scale.float().reshape(())
                out[f"{layer}.scale_input"] = torch.tensor(1.0)
            else:
                out[f"{layer}.weight_scale"] = scale.float().reshape(())
                out[f"{layer}.comfy_quant"] = torch.tensor(
                    list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
                )
        else:
            out[key] = value.half()
    if layout == "legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_comfyui_fp8_scaled_single_file(hf_model, tmp_path, layout):
    sd = quantize_fp8(encoder_sd(hf_model), layout)
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    meta = None
    if layout == "new":
        meta = {"_quantization_metadata": json.dumps({"layers": {"x": {"format": "float8_e4m3fn"}}})}
    save_state_dict(sd, path, metadata=meta)
    model = load_t5(path, dtype=torch.bfloat16)
    key = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    scale = sd[key.replace(".weight", ".scale_weight" if layout == "legacy" else ".weight_scale")]
    weight = model.state_dict()[key]
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, (sd[key].float() * scale).bfloat16())
    ids, mask = inputs()
    with torch.no_grad():
        ours = model(ids, mask).float()
    want = reference(hf_model, ids, mask)
    assert (ours - want).norm() / want.norm() < 0.1  # fp8 weights and bf16 compute: close, not equal


def test_prefixed_all_in_one_and_full_seq2seq_checkpoints(hf_model, tmp_path):
    sd = encoder_sd(hf_model)
    prefix = "text_encoders.t5xxl.transformer."
    all_in_one = {prefix + k: v for k, v in sd.items()}
    all_in_one["model.diffusion_model.t5_yproj.weight"] = torch.zeros(2, 2)
    save_state_dict(all_in_one, tmp_path / "all_in_one.safetensors")
    model = load_t5(tmp_path / "all_in_one.safetensors")
    assert torch.equal(model.shared.weight, sd["shared.weight"])

    # google/t5-v1_1-xxl ships the whole encoder-decoder, with the tied embedding alias saved too.
    full = {**sd, "encoder.embed_tokens.weight": sd["shared.weight"], "lm_head.weight": torch.zeros(3, 3)}
    full["decoder.final_layer_norm.weight"] = torch.zeros(CONFIG.d_model)
    folder = tmp_path / "t5_v1_1"
    folder.mkdir()
    torch.save(full, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    model = load_t5(folder)
    assert torch.equal(model.shared.weight, sd["shared.weight"])


def test_diffusers_pipeline_folder_and_dtypes(hf_folder, tmp_path):
    root = tmp_path / "pipeline"
    root.mkdir()
    (root / "text_encoder").symlink_to(hf_folder)
    model = load_t5(root, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    half = load_t5(hf_folder, dtype=torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # as HF keeps it
    assert half.shared.weight.dtype == torch.float16
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.isfinite(half(ids, mask)).all()


def test_errors(hf_model, tmp_path):
    with pytest.raises(WeightsError, match="does not exist; give a Hugging Face folder"):
        load_t5(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"found no T5 weights in folder .*looked for model.safetensors"):
        load_t5(empty)
    sd = encoder_sd(hf_model)
    sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] = torch.zeros(5, CONFIG.d_model)
    save_state_dict(sd, tmp_path / "bad.safetensors")
    (tmp_path / "cfg").mkdir()
    save_state_dict(sd, tmp_path / "cfg" / "model.safetensors")
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    with pytest.raises(WeightsError, match=r"detected format: T5 folder, 16/32-bit.*mis-shaped.*wi_0"):
        load_t5(tmp_path / "cfg")
    v1 = {k.replace("wi_0", "wi"): v for k, v in encoder_sd(hf_model).items() if "wi_1" not in k}
    save_state_dict(v1, tmp_path / "v1.safetensors")
    with pytest.raises(WeightsError, match="T5 v1.1"):
        load_t5(tmp_path / "v1.safetensors")
    save_state_dict({"x.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="no key ends in 'encoder.final_layer_norm.weight'"):
        load_t5(tmp_path / "other.safetensors")
    meta = {"_quantization_metadata": json.dumps({"layers": {"a": {"format": "nvfp4"}}})}
    save_state_dict(encoder_sd(hf_model), tmp_path / "nvfp4.safetensors", metadata=meta)
    with pytest.raises(WeightsError, match=r"quantization format\(s\) \['nvfp4'\]"):
        load_t5(tmp_path / "nvfp4.safetensors")
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        load_t5(tmp_path / "bad.safetensors", dtype=torch.float64)
    with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
        T5Config.from_hf({"feed_forward_proj": "relu"})
    # Malformed shapes are named (they raised ValueError / ZeroDivisionError from the config's arithmetic).
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for key, tensor, message in [
        ("shared.weight", torch.zeros(7), r"'shared.weight' has shape \(7,\), where a T5 has two dimensions"),
        (bias, torch.zeros(32, 0), r"has shape \(32, 0\), where a T5 has two dimensions, none of them 0"),
        (bias, torch.zeros(32, 5), r"attention width \d+ does not divide into its 5 heads"),
        (
            "encoder.block.99.layer.0.layer_norm.weight",
            torch.zeros(4),
            r"encoder.block.99 with \d+ indices missing",
        ),
    ]:
        with pytest.raises(WeightsError, match=f"cannot infer the T5 config: .*{message}"):
            infer_t5_config({**encoder_sd(hf_model), key: tensor})


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"model.safetensors.index.json": '{"metadata": {}}'}, "no weight_map in its top level"),
        ({"model.safetensors.index.json": '{"weight_map": {"a": 5}}'}, r"weight_map\['a'\] is 5"),
        ({"sharded.index.json": "[1, 2]"}, "no weight_map in its top level"),
        ({"config.json": "not json", "model.safetensors": None}, r"is not valid JSON"),
        ({"config.json": "[1]", "model.safetensors": None}, r"holds \[1\], not a JSON object"),
    ],
)
def test_a_malformed_folder_names_the_file(hf_model, tmp_path, files, message):
    """A bad index was a KeyError or TypeError traceback; a bad config.json said only "Expecting value"."""
    folder = tmp_path / "t5"
    folder.mkdir()
    for name, text in files.items():
        if text is None:
            save_state_dict(encoder_sd(hf_model), folder / name)
        else:
            (folder / name).write_text(text)
    with pytest.raises(WeightsError, match=f"^'{folder}/[^']+' .*{message}"):
        load_t5(folder)


@pytest.mark.gpu
def test_cuda_matches_cpu(hf_folder, hf_model):
    ids, mask = inputs(length=256)
    want = reference(hf_model, ids, mask)
    with torch.no_grad():
        fp32 = load_t5(hf_folder, device="cuda")(ids.cuda(), mask.cuda()).cpu()
        bf16 = load_t5(hf_folder, dtype=torch.bfloat16, device="cuda")(ids.cuda(), mask.cuda()).float().cpu()
    torch.testing.assert_close(fp32, want, rtol=0, atol=1e-4)
    assert (bf16 - want).norm() / want.norm() < 2e-2

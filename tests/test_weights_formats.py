import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import mochi.weights.formats as formats
from mochi.weights.formats import LOOKED_FOR, component_keys, detect, read_component
from mochi.weights.io import WeightsError

from .dit_checkpoints import (
    COMFY,
    T5_KEYS,
    VAE_KEYS,
    tiny_model,
    write_comfyui,
    write_diffusers,
    write_fp8_scaled,
    write_genmo,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_genmo_folder_with_vae(tmp_path, model):
    write_genmo(tmp_path, model)
    save_file({"blocks.0.0.weight": torch.zeros(8, 12, 1, 1, 1)}, tmp_path / "decoder.safetensors")
    save_file({"layers.0.weight": torch.zeros(8, 15)}, tmp_path / "encoder.safetensors")
    det = detect(tmp_path)
    assert det.format == "genmo"
    assert det.files == {
        "dit": (tmp_path / "dit.safetensors",),
        "vae_decoder": (tmp_path / "decoder.safetensors",),
        "vae_encoder": (tmp_path / "encoder.safetensors",),
    }
    assert det.prefixes == {"dit": "", "vae_decoder": "", "vae_encoder": ""}
    assert det.layouts == {"dit": "genmo", "vae_decoder": "genmo", "vae_encoder": "genmo"}
    assert det.quant == {}
    assert detect(tmp_path / "dit.safetensors").format == "genmo"  # the bare file too
    # A snapshot of the Hugging Face repo also has diffusers folders: Genmo's files win, T5 comes along.
    (tmp_path / "text_encoder").mkdir()
    save_file(
        {k.split("transformer.")[1]: torch.zeros(1) for k in T5_KEYS},
        tmp_path / "text_encoder/model.safetensors",
    )
    det = detect(tmp_path)
    assert det.format == "genmo" and det.files["t5"] == (tmp_path / "text_encoder" / "model.safetensors",)
    assert det.prefixes["t5"] == "" and det.layouts["t5"] == "transformers"


def test_diffusers_pipeline_with_variants(tmp_path, model):
    write_diffusers(tmp_path, model)
    write_diffusers(tmp_path, model, variant="bf16")
    (tmp_path / "vae").mkdir()
    save_file(
        {"decoder.conv_in.weight": torch.zeros(1), "encoder.proj_in.weight": torch.zeros(1)},
        tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
    )
    (tmp_path / "text_encoder").mkdir()
    save_file(
        {k.split("transformer.")[1]: torch.zeros(1) for k in T5_KEYS},
        tmp_path / "text_encoder/model.safetensors",
    )
    (tmp_path / "tokenizer").mkdir()

    det = detect(tmp_path)
    assert det.format == "diffusers" and det.variant is None
    shards = det.files["dit"]
    assert len(shards) > 1 and all("bf16" not in f.name and "-of-" in f.name for f in shards)
    assert det.prefixes == {"dit": "", "vae_decoder": "decoder.", "vae_encoder": "encoder.", "t5": ""}
    assert det.layouts == {
        "dit": "diffusers",
        "vae_decoder": "diffusers",
        "vae_encoder": "diffusers",
        "t5": "transformers",
    }
    assert det.extras == {"tokenizer": tmp_path / "tokenizer", "text_encoder": tmp_path / "text_encoder"}

    bf16 = detect(tmp_path, variant="bf16")
    assert bf16.variant == "bf16" and all(".bf16-" in f.name for f in bf16.files["dit"])
    assert {v[0] for v in component_keys(bf16, "dit").values()} == {"BF16"}
    # The transformer folder alone is a diffusers checkpoint too.
    assert detect(tmp_path / "transformer").files["dit"] == shards
    with pytest.raises(
        WeightsError, match=r"no 'fp16' weight variant .* \(it holds: the plain weights, bf16\)"
    ):
        detect(tmp_path, variant="fp16")
    # A folder without variants said "(variants present: None)".
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "transformer", plain)
    for extra in [p for p in plain.iterdir() if ".bf16" in p.name]:
        extra.unlink()
    with pytest.raises(WeightsError, match=r"it holds only the plain weights; leave --variant out"):
        detect(plain, variant="fp16")


def test_diffusers_variant_alone_and_alternative_index_name(tmp_path, model):
    write_diffusers(tmp_path, model, variant="bf16")
    folder = tmp_path / "transformer"
    # Only the bf16 variant present: it is used without being asked for.
    assert detect(tmp_path).variant == "bf16"
    # Some tools name the variant index X.bf16.safetensors.index.json.
    (folder / "diffusion_pytorch_model.safetensors.index.bf16.json").rename(
        folder / "diffusion_pytorch_model.bf16.safetensors.index.json"
    )
    det = detect(tmp_path)
    assert det.variant == "bf16" and len(det.files["dit"]) > 1


def test_comfyui_all_in_one_exposes_every_component(tmp_path, model):
    det = detect(write_comfyui(tmp_path / "aio.safetensors", model, all_in_one=True))
    assert det.format == "comfyui"
    assert det.prefixes == {
        "dit": COMFY,
        "vae_decoder": "vae.decoder.",
        "vae_encoder": "vae.encoder.",
        "t5": "text_encoders.t5xxl.transformer.",
    }
    assert det.layouts["vae_decoder"] == "genmo" and det.layouts["t5"] == "transformers"
    assert set(read_component(det, "vae_decoder")) == {"blocks.0.0.weight", "output_proj.weight"}
    assert set(read_component(det, "t5")) == {k.split("transformer.")[1] for k in T5_KEYS}
    assert set(read_component(det, "dit")) == set(model.state_dict())
    assert set(component_keys(det, "vae_encoder")) == {
        k.removeprefix("vae.encoder.") for k in VAE_KEYS if "encoder" in k
    }


def test_comfyui_dit_only(tmp_path, model):
    det = detect(write_comfyui(tmp_path / "dit.safetensors", model))
    assert det.format == "comfyui" and set(det.files) == {"dit"}
    assert det.describe() == "comfyui (dit [genmo])"


@pytest.mark.parametrize(("layout", "quant"), [("legacy", "scaled_fp8"), ("new", "comfy_quant")])
def test_fp8_layouts(tmp_path, model, layout, quant):
    det = detect(write_fp8_scaled(tmp_path / "f.safetensors", model, layout=layout))
    assert det.quant == {"dit": quant}
    assert det.describe().startswith(f"comfyui (dit [genmo] fp8 {quant}, vae_decoder")


def test_detection_reads_no_tensor_data(tmp_path, model, monkeypatch):
    path = write_fp8_scaled(tmp_path / "f.safetensors", model, layout="new")
    real = formats.safe_open

    class HeadersOnly:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            if name == "get_tensor":
                raise AssertionError("detection read tensor data")
            return getattr(self.f, name)

    monkeypatch.setattr(formats, "safe_open", HeadersOnly)
    assert detect(path).quant == {"dit": "comfy_quant"}
    monkeypatch.setattr(formats, "safe_open", real)
    assert detect(path).quant == {"dit": "comfy_quant"}


def test_bad_paths_give_one_line_errors(tmp_path):
    with pytest.raises(WeightsError) as e:
        detect(tmp_path / "missing")
    assert str(e.value) == f"checkpoint {str(tmp_path / 'missing')!r} does not exist; {LOOKED_FOR}"
    assert "\n" not in str(e.value) and "Genmo folder" in LOOKED_FOR and "fp8_scaled" in LOOKED_FOR

    (tmp_path / "empty").mkdir()
    with pytest.raises(
        WeightsError, match=r"holds no recognised checkpoint \(it holds: nothing\); looked for: "
    ):
        detect(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        WeightsError, match=r"is not a \.safetensors, \.gguf, index \.json or \.pt/\.bin file; looked"
    ):
        detect(tmp_path / "notes.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"is not a readable safetensors file .*; looked for"):
        detect(tmp_path / "junk.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match=r"no Mochi component recognised in .* \(keys: foo.weight\)"):
        detect(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "gone.safetensors"}})
    )
    with pytest.raises(WeightsError, match="names shards that are missing: gone.safetensors"):
        detect(tmp_path / "bad.safetensors.index.json")


def test_torch_files_are_read_weights_only(tmp_path, model):
    torch.save({COMFY + k: v for k, v in model.state_dict().items()}, tmp_path / "dit.pt")
    det = detect(tmp_path / "dit.pt")
    assert det.format == "comfyui" and det.prefixes == {"dit": COMFY}
    assert set(read_component(det, "dit")) == set(model.state_dict())


def test_quantization_metadata_is_attributed_to_its_component(tmp_path, model):
    """An all-in-one file whose header lists only T5 layers as fp8: the DiT is not quantized."""
    from .dit_checkpoints import state_dict

    tensors = {COMFY + k: v for k, v in state_dict(model, torch.bfloat16).items()}
    tensors.update({k: torch.zeros(s) for k, s in T5_KEYS.items()})
    layer = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    meta = {"_quantization_metadata": json.dumps({"layers": {layer: {"format": "float8_e4m3fn"}}})}
    save_file(tensors, tmp_path / "aio.safetensors", metadata=meta)
    assert detect(tmp_path / "aio.safetensors").quant == {"t5": "comfy_quant"}


def test_bad_index_files_are_one_line_errors_naming_the_index(tmp_path):
    from mochi.weights.io import read_state_dict

    for content, message in [
        (
            {"weight_map": []},
            r"weight_map must be an object mapping tensor names to shard file names, got list",
        ),
        (
            {"weight_map": {"a": 5}},
            r"weight_map\['a'\] is 5; every value must be the file name of a \.safetensors",
        ),
        ({"weight_map": {"a": None}}, r"weight_map\['a'\] is null; every value must be the file name"),
        ([1, 2], r"is not a safetensors index with a weight_map \(no weight_map in its top level\)"),
    ]:
        index = tmp_path / "model.safetensors.index.json"
        index.write_text(json.dumps(content))
        for read in (detect, read_state_dict):
            with pytest.raises(WeightsError, match=rf"^{re.escape(repr(str(index)))} .*{message}") as e:
                read(index)
            assert "\n" not in str(e.value)
    index.write_bytes(b"\xff\xfe{")
    with pytest.raises(WeightsError, match=r"is not a safetensors index with a weight_map \('utf-8' codec"):
        read_state_dict(index)


def test_torch_file_with_non_string_keys_is_a_weights_error(tmp_path):
    from mochi.weights.io import read_state_dict

    path = tmp_path / "intkey.pt"
    torch.save({1: torch.zeros(2)}, path)
    for read in (detect, read_state_dict):
        with pytest.raises(
            WeightsError,
            match=r"does not hold a flat mapping of tensor names to tensors: key 1 is int, not a str",
        ):
            read(path)


def test_integer_tensors_where_weights_belong_are_refused(tmp_path, model):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mochi.weights.bundle import embedded_path, load_bundle
    from mochi.weights.dit import load_dit

    from .dit_checkpoints import state_dict

    sd = state_dict(model)
    sd["blocks.0.attn.proj_y.weight"] = sd["blocks.0.attn.proj_y.weight"].to(torch.int32)
    save_file(sd, tmp_path / "dit.safetensors")
    rule = r"weights must be floating point: float32, bfloat16, float16 or fp8"
    for quantize in (None, "int8"):
        with pytest.raises(
            WeightsError, match=rf"1 not floating point: blocks\.0\.attn\.proj_y\.weight is int32 \({rule}\)"
        ) as e:
            if quantize is None:
                load_dit(tmp_path / "dit.safetensors")
            else:
                from mochi.weights.dit import load_dit_quantized

                load_dit_quantized(tmp_path / "dit.safetensors", quantize)
        assert "\n" not in str(e.value)
    # A bundle (one file of every component) takes the same rule, at load_strict.
    src = embedded_path()
    tensors, meta = load_file(src), safe_open(src, "pt").metadata()
    tensors["decoder.blocks.0.0.weight"] = tensors["decoder.blocks.0.0.weight"].to(torch.int16)
    save_file(tensors, tmp_path / "bundle.safetensors", metadata=meta)
    with pytest.raises(
        WeightsError,
        match=rf"mochi-bundle .*bundle.safetensors' \(decoder\)\) .*blocks\.0\.0\.weight is int16 \({rule}\)",
    ):
        load_bundle(tmp_path / "bundle.safetensors")

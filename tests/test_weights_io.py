import pytest
import torch
from torch import nn

from mochi.weights.io import (
    WeightsError,
    load_strict,
    read_keys,
    read_metadata,
    read_state_dict,
    save_state_dict,
)


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_round_trip_is_bit_exact(tmp_path):
    sd = {k: v.clone() for k, v in _model().state_dict().items()}
    save_state_dict(sd, tmp_path / "m.safetensors", metadata={"config": "{}"})
    back = read_state_dict(tmp_path / "m.safetensors")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert read_metadata(tmp_path / "m.safetensors") == {"config": "{}"}
    assert read_keys(tmp_path / "m.safetensors")["0.weight"] == ("F32", (4, 3))


def test_sharded_index(tmp_path):
    import json

    sd = _model().state_dict()
    keys = sorted(sd)
    save_state_dict({k: sd[k] for k in keys[:2]}, tmp_path / "a-00001.safetensors")
    save_state_dict({k: sd[k] for k in keys[2:]}, tmp_path / "a-00002.safetensors")
    wm = {k: "a-00001.safetensors" if k in keys[:2] else "a-00002.safetensors" for k in keys}
    (tmp_path / "a.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    assert read_state_dict(tmp_path).keys() == sd.keys()
    assert read_state_dict(tmp_path / "a.safetensors.index.json").keys() == sd.keys()


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    """The last shard read won silently, whatever the index named (a stale shard left by an earlier save)."""
    import json

    from mochi.weights.formats import detect
    from mochi.weights.io import iter_safetensors

    sd = _model().state_dict()
    keys = sorted(sd)
    save_state_dict({k: sd[k] for k in keys[:2]}, tmp_path / "a-00001.safetensors")
    save_state_dict({k: sd[k] + 7 for k in keys[1:]}, tmp_path / "a-00002.safetensors")  # keys[1] again
    wm = {k: "a-00001.safetensors" if k in keys[:2] else "a-00002.safetensors" for k in keys}
    (tmp_path / "a.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    message = f"tensor '{keys[1]}' is stored in two shards, a-00001.safetensors and a-00002.safetensors"
    with pytest.raises(WeightsError, match=message):
        read_state_dict(tmp_path / "a.safetensors.index.json")
    with pytest.raises(WeightsError, match=message):
        dict(iter_safetensors(sorted(tmp_path.glob("*.safetensors"))))
    with pytest.raises(WeightsError, match=message):
        detect(tmp_path / "a.safetensors.index.json")


def test_torch_files_are_weights_only(tmp_path):
    sd = _model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    assert read_state_dict(tmp_path / "m.pt").keys() == sd.keys()
    torch.save({"sd": sd, "fn": print}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="holds Python objects other than tensors .*never arbitrary"):
        read_state_dict(tmp_path / "evil.pt")


def test_load_strict_assigns_without_copy():
    src = _model().state_dict()
    with torch.device("meta"):
        m = _model()
    load_strict(m, src, fmt="test")
    assert m[0].weight.data_ptr() == src["0.weight"].data_ptr()


def test_load_strict_names_every_problem():
    sd = dict(_model().state_dict())
    sd.pop("1.bias")
    sd["extra"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 3)
    with torch.device("meta"):
        m = _model()
    with pytest.raises(WeightsError) as e:
        load_strict(m, sd, fmt="genmo")
    msg = str(e.value)
    assert "detected format: genmo" in msg
    assert "1 missing: 1.bias" in msg
    assert "1 unexpected: extra" in msg
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in msg


def test_missing_checkpoint():
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict("/nonexistent/x.safetensors")


def test_equal_inputs_give_equal_bytes_whatever_the_metadata_order(tmp_path):
    """safetensors writes its metadata through a hash map: ten writes of one file gave ten different byte
    strings (LoRAs, train-lora states and prepare-data clips differed run to run)."""
    from safetensors.torch import save_file

    tensors = {"b": torch.zeros(3), "a": torch.ones(2, dtype=torch.bfloat16)}
    metadata = {key: f'value {key} é\n"' for key in "hgfedcba"}
    raw = set()
    for i in range(6):
        save_file(tensors, tmp_path / f"raw{i}.safetensors", metadata=metadata)
        raw.add((tmp_path / f"raw{i}.safetensors").read_bytes())
    assert len(raw) > 1  # the library's own writer: if this fails, it became deterministic itself
    ours = set()
    for i in range(6):
        save_state_dict(tensors, tmp_path / f"ours{i}.safetensors", metadata=dict(reversed(metadata.items())))
        ours.add((tmp_path / f"ours{i}.safetensors").read_bytes())
    assert len(ours) == 1
    assert read_metadata(tmp_path / "ours0.safetensors") == metadata
    assert read_state_dict(tmp_path / "ours0.safetensors")["a"].equal(tensors["a"])


def test_a_wrapped_torch_checkpoint_names_the_key_holding_its_tensors(tmp_path):
    """{"model": state_dict} was refused as "does not hold a flat mapping" with no hint where the weights are
    ({"state_dict": ...}, Lightning's, is read)."""
    sd = _model().state_dict()
    torch.save({"model": sd, "step": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(WeightsError, match=r"does not hold a flat mapping .*; its tensors are under 'model'"):
        read_state_dict(tmp_path / "wrapped.pt")
    torch.save({"state_dict": sd}, tmp_path / "lightning.ckpt")
    assert read_state_dict(tmp_path / "lightning.ckpt").keys() == sd.keys()

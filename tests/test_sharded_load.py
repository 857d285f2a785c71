"""Under torchrun each rank reads only its shard of the DiT and T5 (mochi.parallel.sharded_load).

Two gloo ranks (plain subprocesses with torchrun's variables, one thread each) load in shards a Genmo-named
DiT file, the same DiT as a diffusers folder (fused q/k/v and swapped halves read row by row) and as a
ComfyUI scaled-fp8 file (fp8 block weights kept fp8), and a T5 file: each must read about half of the bytes,
and the sharded models must give the outputs of the models loaded whole in one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.models.t5 import T5_PRESETS, T5Encoder
from mochi.weights.dit import load_dit
from mochi.weights.io import save_state_dict
from mochi.weights.t5 import load_t5

from .test_parallel import _free_port

ROOT = Path(__file__).resolve().parents[1]
# 4 heads (sequence-parallel-friendly), 3 blocks; rows of every tensor split over 2 ranks, some unevenly.
DIT = dataclasses.replace(DIT_PRESETS["tiny"], num_heads=4, depth=3, hidden_size_x=64, hidden_size_y=48)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 2, 4, 4, generator=g)
    return x, torch.tensor([0.4]), torch.randn(1, 5, 32, generator=g), torch.ones(1, 5, dtype=torch.bool)


def _t5_inputs():
    ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(2))
    return ids, torch.tensor([[1] * 7, [1] * 3 + [0] * 4]).bool()


# (checkpoint, fp8 mode): the scaled-fp8 file twice, its block weights kept fp8 and widened at load.
DIT_FILES = (("dit.safetensors", "keep"), ("diffusers", "keep"), ("fp8.safetensors", "keep"))
DIT_FILES += (("fp8.safetensors", "dequantize"),)


def rank_job(folder: str) -> None:
    """One rank: load the DiT and T5 in shards, run them, write their outputs and the bytes read."""
    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.sharded_load import load_dit_sharded, load_t5_sharded, t5_sources
    from mochi.weights.formats import detect

    torch.set_num_threads(1)
    world = init_world("cpu")
    dits, reads = [], []
    for name, fp8 in DIT_FILES:
        dit, read = load_dit_sharded(detect(Path(folder) / name), world, torch.float32, fp8)
        kept = type(dit.blocks[0].attn.qkv_x).__name__ == "Fp8Linear"
        assert kept == ((name, fp8) == ("fp8.safetensors", "keep")), (name, fp8)  # fp8 shards stay fp8
        dits.append(dit)
        reads.append(read)
    t5, read_t5 = load_t5_sharded(*t5_sources(str(Path(folder) / "t5.safetensors"), None), world)
    with torch.inference_mode():
        out = [dit(*_inputs()) for dit in dits], t5(*_t5_inputs())
    torch.save(out, Path(folder) / f"out{world.rank}.pt")
    (Path(folder) / f"read{world.rank}.json").write_text(json.dumps([*reads, read_t5]))
    close_world()


def test_each_rank_reads_its_shard_and_the_model_matches(tmp_path):
    from safetensors import safe_open

    from .dit_checkpoints import write_diffusers, write_fp8_scaled

    torch.manual_seed(0)
    model = AsymmDiT(DIT).eval()
    sd = model.state_dict()
    save_state_dict(sd, tmp_path / "dit.safetensors")
    write_diffusers(tmp_path / "diffusers", model)  # fp32, in several shards
    write_fp8_scaled(tmp_path / "fp8.safetensors", model, layout="new", all_in_one=False)
    t5 = T5Encoder(T5_PRESETS["t5-tiny"])
    t5.initialize_weights()
    save_state_dict(t5.state_dict(), tmp_path / "t5.safetensors")  # HF's key names, as a ComfyUI fp16 file
    with safe_open(tmp_path / "fp8.safetensors", "pt") as f:  # its weights; every rank reads the scales
        fp8 = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    n_scales = sum(k.endswith(".weight_scale") for k in fp8)
    fp8 = {k: v for k, v in fp8.items() if not k.endswith((".weight_scale", ".comfy_quant"))}
    totals = [
        sum(t.numel() * t.element_size() for t in d.values()) for d in (sd, sd, fp8, fp8, t5.state_dict())
    ]
    extra = [
        0,
        0,
        2 * 4 * n_scales,
        2 * 4 * n_scales,
        0,
    ]  # bytes read twice: the fp8 scales, fp32 (), by both ranks
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "MOCHI_DIST_TIMEOUT": "30"}  # fmt: skip
        code = f"from tests.test_sharded_load import rank_job; rank_job({str(tmp_path)!r})"
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE)
        )
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-3000:]
    reads = [json.loads((tmp_path / f"read{r}.json").read_text()) for r in range(2)]
    for i, (total, twice) in enumerate(zip(totals, extra, strict=True)):
        assert sum(r[i] for r in reads) == total + twice  # every byte read once, by one rank
        assert all(0.4 * total < r[i] < 0.6 * total + twice for r in reads)
    with torch.inference_mode():
        expected = (
            [load_dit(tmp_path / name, dtype=torch.float32, fp8=fp8)(*_inputs()) for name, fp8 in DIT_FILES],
            load_t5(tmp_path / "t5.safetensors")(*_t5_inputs()),
        )
    assert not torch.equal(expected[0][2], expected[0][0])  # the fp8 file's model is its own
    for r in range(2):
        got = torch.load(tmp_path / f"out{r}.pt")
        for (name, _), a, b in zip(DIT_FILES, got[0], expected[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)

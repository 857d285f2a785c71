"""Under torchrun each rank reads only its shard of the DiT and T5 (mochi.parallel.sharded_load).

Two gloo ranks (plain subprocesses with torchrun's variables, one thread each) load a Genmo-named DiT
file and a T5 file in shards: each must read about half of the bytes, and the sharded models must give
the outputs of the models loaded whole in one process.
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


def rank_job(folder: str) -> None:
    """One rank: load the DiT and T5 in shards, run them, write their outputs and the bytes read."""
    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.sharded_load import load_dit_sharded, load_t5_sharded, t5_sources
    from mochi.weights.formats import detect

    torch.set_num_threads(1)
    world = init_world("cpu")
    dit, read = load_dit_sharded(detect(Path(folder) / "dit.safetensors"), world, torch.float32)
    t5, read_t5 = load_t5_sharded(*t5_sources(str(Path(folder) / "t5.safetensors"), None), world)
    with torch.inference_mode():
        out = dit(*_inputs()), t5(*_t5_inputs())
    torch.save(out, Path(folder) / f"out{world.rank}.pt")
    (Path(folder) / f"read{world.rank}.json").write_text(json.dumps([read, read_t5]))
    close_world()


def test_each_rank_reads_its_shard_and_the_model_matches(tmp_path):
    torch.manual_seed(0)
    sd = AsymmDiT(DIT).state_dict()
    save_state_dict(sd, tmp_path / "dit.safetensors")
    t5 = T5Encoder(T5_PRESETS["t5-tiny"])
    t5.initialize_weights()
    save_state_dict(t5.state_dict(), tmp_path / "t5.safetensors")  # HF's key names, as a ComfyUI fp16 file
    totals = [sum(t.numel() * t.element_size() for t in d.values()) for d in (sd, t5.state_dict())]
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
    for model, total in enumerate(totals):
        assert sum(r[model] for r in reads) == total  # every byte read once, by one rank
        assert all(0.4 * total < r[model] < 0.6 * total for r in reads)
    with torch.inference_mode():
        expected = (
            load_dit(tmp_path / "dit.safetensors", dtype=torch.float32)(*_inputs()),
            load_t5(tmp_path / "t5.safetensors")(*_t5_inputs()),
        )
    for r in range(2):
        got = torch.load(tmp_path / f"out{r}.pt")
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)

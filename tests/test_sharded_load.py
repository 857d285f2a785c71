"""Under torchrun each rank reads only its shard of the DiT (mochi.parallel.sharded_load).

Two gloo ranks (plain subprocesses with torchrun's variables, one thread each) load a Genmo-named DiT
file in shards: each must read about half of the bytes, and the sharded model must give the output of
the model loaded whole in one process.
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
from mochi.weights.dit import load_dit
from mochi.weights.io import save_state_dict

from .test_parallel import _free_port

ROOT = Path(__file__).resolve().parents[1]
# 4 heads (sequence-parallel-friendly), 3 blocks; rows of every tensor split over 2 ranks, some unevenly.
DIT = dataclasses.replace(DIT_PRESETS["tiny"], num_heads=4, depth=3, hidden_size_x=64, hidden_size_y=48)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 2, 4, 4, generator=g)
    return x, torch.tensor([0.4]), torch.randn(1, 5, 32, generator=g), torch.ones(1, 5, dtype=torch.bool)


def rank_job(folder: str) -> None:
    """One rank: load the DiT in shards, run it, write its output and the bytes it read."""
    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.sharded_load import load_dit_sharded
    from mochi.weights.formats import detect

    torch.set_num_threads(1)
    world = init_world("cpu")
    dit, read = load_dit_sharded(detect(Path(folder) / "dit.safetensors"), world, torch.float32)
    with torch.inference_mode():
        out = dit(*_inputs())
    torch.save(out, Path(folder) / f"out{world.rank}.pt")
    (Path(folder) / f"read{world.rank}.json").write_text(json.dumps(read))
    close_world()


def test_each_rank_reads_its_shard_and_the_model_matches(tmp_path):
    torch.manual_seed(0)
    sd = AsymmDiT(DIT).state_dict()
    save_state_dict(sd, tmp_path / "dit.safetensors")
    total = sum(t.numel() * t.element_size() for t in sd.values())
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
    assert sum(reads) == total  # every byte read once, by one rank
    assert all(0.4 * total < r < 0.6 * total for r in reads)
    whole = load_dit(tmp_path / "dit.safetensors", dtype=torch.float32)
    with torch.inference_mode():
        expected = whole(*_inputs())
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"out{r}.pt"), expected, atol=1e-5, rtol=1e-5)

"""Under torchrun each rank reads only its shard of the DiT and T5 (mochi.parallel.sharded_load).

Two gloo ranks (plain subprocesses with torchrun's variables, one thread each) load in shards a Genmo-named
DiT file, the same DiT as a diffusers folder (fused q/k/v and swapped halves read row by row), as a
ComfyUI scaled-fp8 file (fp8 block weights kept fp8), as Kijai GGUF-in-safetensors files (Q8_0 kept as
blocks, Q4_0 widened) and as .gguf files in Genmo's and diffusers' naming (blocks kept), and T5 from a
16/32-bit file and a ComfyUI scaled-fp8 file: each must read about half of the bytes, ggml blocks must stay
blocks sharded by FSDP2, and the sharded models must give the outputs of the models loaded whole in one
process. One launch of the two ranks serves every layout.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
# ggml blocks: Kijai's files (Q8_0 kept, Q4_0 widened at load), .gguf in Genmo's and diffusers' naming.
GGUF_FILES = (("q8.safetensors", "keep"), ("q4.safetensors", "dequantize"))
GGUF_FILES += (("genmo.gguf", "keep"), ("diffusers.gguf", "keep"))
DIT_FILES += GGUF_FILES
T5_FILES = ("t5.safetensors", "t5_fp8.safetensors")


def rank_job(folder: str) -> None:
    """One rank: load the DiT and T5 in shards, run them, write their outputs and the bytes read."""
    from torch.distributed.tensor import DTensor

    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.sharded_load import load_dit_sharded, load_t5_sharded, t5_sources
    from mochi.weights.formats import detect

    torch.set_num_threads(1)
    # FSDP2 imports torch._dynamo at its first shard (4 s): import it now, while the test writes.
    importlib.import_module("torch._dynamo")

    ready = Path(folder) / "ready"  # the ranks start (imports) while the test writes the checkpoints
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert time.monotonic() < deadline, "the test never wrote its checkpoints"
        time.sleep(0.05)
    world = init_world("cpu")
    dits, reads = [], []
    for name, fp8 in DIT_FILES:
        dit, read = load_dit_sharded(detect(Path(folder) / name), world, torch.float32, fp8)
        kind = type(dit.blocks[0].attn.qkv_x).__name__
        blocks = fp8 == "keep" and (name, fp8) in GGUF_FILES
        assert (kind == "Fp8Linear") == ((name, fp8) == ("fp8.safetensors", "keep")), (name, fp8)
        assert (kind == "GgufLinear") == blocks, (name, fp8)  # ggml shards stay blocks
        if blocks:  # the blocks are FSDP2-sharded by rows, not replicated
            q = dit.blocks[0].attn.qkv_x.qweight
            assert isinstance(q, DTensor) and q.to_local().shape[0] == q.shape[0] // 2, name
        dits.append(dit)
        reads.append(read)
    t5s = [load_t5_sharded(*t5_sources(str(Path(folder) / n), None), world) for n in T5_FILES]
    with torch.inference_mode():
        out = [dit(*_inputs()) for dit in dits], [t5(*_t5_inputs()) for t5, _ in t5s]
    torch.save(out, Path(folder) / f"out{world.rank}.pt")
    (Path(folder) / f"read{world.rank}.json").write_text(json.dumps([*reads, *(r for _, r in t5s)]))
    close_world()
    sys.stderr.flush()
    os._exit(0)  # the test needs only the files: skip the interpreter's teardown (seconds under load)


def test_each_rank_reads_its_shard_and_the_model_matches(tmp_path):
    port = _free_port()  # the ranks import while the checkpoints are written
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "MOCHI_DIST_TIMEOUT": "30"}  # fmt: skip
        code = f"from tests.test_sharded_load import rank_job; rank_job({str(tmp_path)!r})"
        with open(tmp_path / f"err{rank}.txt", "w") as err:  # a file: a full pipe would stall the rank
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=err))
    try:
        _check(tmp_path, procs)
    finally:
        for p in procs:
            p.kill()


def _check(tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    from safetensors import safe_open

    from mochi.weights.gguf_file import gguf_header
    from mochi.weights.keymaps.dit_diffusers import genmo_to_diffusers

    from .dit_checkpoints import write_diffusers, write_fp8_scaled
    from .gguf_files import block_layers, write_gguf, write_kijai
    from .test_t5 import quantize_fp8

    torch.manual_seed(0)
    model = AsymmDiT(DIT).eval()
    sd = model.state_dict()
    save_state_dict(sd, tmp_path / "dit.safetensors")
    write_diffusers(tmp_path / "diffusers", model)  # fp32, in several shards
    write_fp8_scaled(tmp_path / "fp8.safetensors", model, layout="new", all_in_one=False)
    t5 = T5Encoder(T5_PRESETS["t5-tiny"])
    t5.initialize_weights()
    save_state_dict(t5.state_dict(), tmp_path / "t5.safetensors")  # HF's key names, as a ComfyUI fp16 file
    t5_fp8 = quantize_fp8(t5.state_dict(), "legacy")  # fp8 Linear weights, the rest fp16
    save_state_dict(t5_fp8, tmp_path / "t5_fp8.safetensors")
    write_kijai(tmp_path / "q8.safetensors", sd, "Q8_0", torch.float32)
    write_kijai(tmp_path / "q4.safetensors", sd, "Q4_0", torch.float32)
    write_gguf(tmp_path / "genmo.gguf", sd, {f"{n}.weight": "Q4_0" for n in block_layers(sd)})
    diff_sd = genmo_to_diffusers(sd)
    quantized = [k for k, t in diff_sd.items() if k.startswith("transformer_blocks.") and t.ndim == 2]
    quantized = [k for k in quantized if diff_sd[k].shape[1] % 32 == 0]
    write_gguf(tmp_path / "diffusers.gguf", diff_sd, {k: "Q8_0" for k in quantized if k.endswith(".weight")})
    with safe_open(tmp_path / "fp8.safetensors", "pt") as f:  # its weights; every rank reads the scales
        fp8 = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    n_scales = sum(k.endswith(".weight_scale") for k in fp8)
    fp8 = {k: v for k, v in fp8.items() if not k.endswith((".weight_scale", ".comfy_quant"))}
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
    gguf = {
        name: sum(sizes[d] * math.prod(shape) for d, shape in gguf_header(tmp_path / name).values())
        for name in ("genmo.gguf", "diffusers.gguf")
    }
    with (
        safe_open(tmp_path / "q8.safetensors", "pt") as q8,
        safe_open(tmp_path / "q4.safetensors", "pt") as q4,
    ):
        kijai = [sum(f.get_tensor(k).nbytes for k in f.keys()) for f in (q8, q4)]  # noqa: SIM118
    t5_scales = sum(k.endswith(".scale_weight") for k in t5_fp8)
    t5_fp8 = {k: v for k, v in t5_fp8.items() if not k.endswith((".scale_weight", ".scale_input"))}
    t5_fp8.pop("scaled_fp8")
    totals = [sum(t.numel() * t.element_size() for t in d.values()) for d in (sd, sd, fp8, fp8)]
    totals += [*kijai, gguf["genmo.gguf"], gguf["diffusers.gguf"]]
    totals += [sum(t.nbytes for t in d.values()) for d in (t5.state_dict(), t5_fp8)]
    # Bytes read twice: the fp8 scales, fp32 (), by both ranks.
    extra = [0, 0, 2 * 4 * n_scales, 2 * 4 * n_scales, 0, 0, 0, 0, 0, 2 * 4 * t5_scales]
    (tmp_path / "ready").touch()
    with torch.inference_mode():  # while the ranks work
        expected = (
            [load_dit(tmp_path / name, dtype=torch.float32, fp8=fp8)(*_inputs()) for name, fp8 in DIT_FILES],
            [load_t5(tmp_path / name)(*_t5_inputs()) for name in T5_FILES],
        )
    for rank, p in enumerate(procs):
        p.wait(timeout=180)
        assert p.returncode == 0, (tmp_path / f"err{rank}.txt").read_text()[-3000:]
    reads = [json.loads((tmp_path / f"read{r}.json").read_text()) for r in range(2)]
    for i, (total, twice) in enumerate(zip(totals, extra, strict=True)):
        assert sum(r[i] for r in reads) == total + twice  # every byte read once, by one rank
        assert all(0.4 * total < r[i] < 0.6 * total + twice for r in reads)
    assert not torch.equal(expected[0][2], expected[0][0])  # the fp8 file's model is its own
    for r in range(2):
        got = torch.load(tmp_path / f"out{r}.pt")
        for (name, _), a, b in zip(DIT_FILES, got[0], expected[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        for name, a, b in zip(T5_FILES, got[1], expected[1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_sharded_load_refuses_integer_weights_from_headers_before_any_collective(tmp_path):
    from safetensors.torch import load_file, save_file

    from mochi.parallel.context import World
    from mochi.parallel.sharded_load import _check_float_weights, load_dit_sharded
    from mochi.weights.formats import detect
    from mochi.weights.io import WeightsError

    from .dit_checkpoints import tiny_model, write_fp8_scaled, write_genmo
    from .gguf_files import write_kijai

    model = tiny_model()
    genmo = write_genmo(tmp_path / "g", model) / "dit.safetensors"
    sd = load_file(genmo)
    sd["blocks.0.attn.proj_y.weight"] = sd["blocks.0.attn.proj_y.weight"].to(torch.int32)
    save_file(sd, tmp_path / "int.safetensors")
    world = World(rank=0, size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")  # no group exists
    with pytest.raises(WeightsError, match=r"1 not floating point: blocks\.0\.attn\.proj_y\.weight is I32"):
        load_dit_sharded(detect(tmp_path / "int.safetensors"), world, torch.float32)
    # Quantized files' bookkeeping is not a weight: fp8 (scales), ComfyUI comfy_quant bytes, ggml blocks.
    write_fp8_scaled(tmp_path / "fp8.safetensors", model, layout="new", all_in_one=False)
    write_kijai(tmp_path / "q8.safetensors", load_file(genmo), "Q8_0", torch.float32)
    for ok in (genmo, tmp_path / "fp8.safetensors", tmp_path / "q8.safetensors"):
        _check_float_weights(detect(ok))

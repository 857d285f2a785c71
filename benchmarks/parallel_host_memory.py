"""Host memory per rank when loading the DiT under torchrun: each rank reads its shard vs the whole file.

    PYTHONPATH=src python benchmarks/parallel_host_memory.py [--depth 8] [--ranks 2] [--layouts genmo ...]

Writes a DiT checkpoint (random weights; ``--depth`` blocks at width 1024) in each layout — ``genmo``: a
Genmo-named bf16 file; ``diffusers``: a diffusers ``transformer/`` folder in bf16 (q/k/v split, SwiGLU
halves swapped); ``fp8``: a ComfyUI scaled-fp8 file (Linear weights e4m3fn with per-tensor scales, the
rest bf16); ``q8_0`` / ``q4_0``: Kijai's GGUF-in-safetensors layout (the blocks' Linear weights as ggml
blocks, the rest bf16, as ``mochi convert --quantize`` writes it); ``gguf``: a ``.gguf`` file in Genmo's
naming (Q8_0 blocks, the rest F16) — then measures what each process adds while loading it, above its
state after imports: one process loading it whole
(``load_dit``, what every rank did before), and ``--ranks`` gloo ranks each loading its FSDP2 shard
(``load_dit_sharded``), as bf16 (the file's dtype) and as fp32 (a cast, as CPU ranks compute in fp32);
ggml blocks stay blocks. ``t5_fp8``: a T5 v1.1 encoder (``--depth`` layers at width 1024) in ComfyUI's
scaled-fp8 layout (Linear weights e4m3fn with per-tensor scales, the rest fp16), loaded in fp32 as T5 is
under torchrun: whole (``load_t5``) vs each rank its rows (``load_t5_sharded``).
One thread per process. Two figures, sampled every 2 ms by a thread: the peak of private memory (RssAnon:
tensors the process owns) and the peak of all resident memory (VmRSS, which adds the pages of the
memory-mapped file the process touched: page cache, shared by the ranks of a node and reclaimable).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


class _Peaks:
    """Polls RssAnon and VmRSS of this process in a thread; ``stop()`` returns their peaks above the start."""

    def __init__(self) -> None:
        import threading

        self.base = {k: _status(k) for k in ("RssAnon", "VmRSS")}
        self.peak = dict(self.base)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.002):
            for k in self.peak:
                self.peak[k] = max(self.peak[k], _status(k))

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.thread.join()
        return {k: max(self.peak[k], _status(k)) - self.base[k] for k in self.peak}


def _child(path: str, sharded: bool, dtype_name: str) -> None:
    import torch

    torch.set_num_threads(1)
    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.sharded_load import load_dit_sharded, load_t5_sharded, t5_sources
    from mochi.weights.dit import load_dit
    from mochi.weights.formats import detect
    from mochi.weights.t5 import load_t5

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    world = init_world("cpu") if sharded else None
    t5 = Path(path).name.startswith("t5")
    det = None if t5 else detect(path)
    peaks = _Peaks()
    files = [Path(path)] if Path(path).is_file() else list(Path(path).rglob("*.safetensors"))
    if t5 and sharded:
        dit, read = load_t5_sharded(*t5_sources(path, None), world)
    elif t5:
        dit, read = load_t5(path, dtype=dtype), sum(f.stat().st_size for f in files)
    elif sharded:
        dit, read = load_dit_sharded(det, world, dtype)
    else:
        dit, read = load_dit(det, dtype=dtype), sum(f.stat().st_size for f in files)
    # Tensors may still be lazy views of the memory-mapped file: touch every byte kept, as a forward would.
    for t in dit.state_dict().values():
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()  # as bytes: fp8 tensors have no max
    print(json.dumps({**peaks.stop(), "read": read}))
    if world is not None:
        close_world()


def _run(path: Path, ranks: int, dtype: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}"}
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1")
            env["MASTER_PORT"] = str(port)
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
        code += f"import parallel_host_memory as m; m._child({str(path)!r}, {ranks > 1}, {dtype!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE))
    return [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]


def _write_gguf(path: Path, sd: dict) -> Path:
    """A .gguf file written by the gguf package: the blocks' Linear weights as Q8_0 blocks (mochi's
    quantizer, byte-identical to gguf's), the rest F16 (fp32 islands F32)."""
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter

    from mochi.weights import ggml
    from mochi.weights.dit import keeps_fp32

    writer = GGUFWriter(path, "mochi")
    for name, t in sd.items():
        if name.startswith("blocks.") and name.endswith(".weight") and t.ndim == 2 and t.shape[1] % 32 == 0:
            q = ggml.quantize(t, "Q8_0").numpy()
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, t.to(torch.float32 if keeps_fp32(name) else torch.float16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_t5_fp8(path: Path, depth: int) -> Path:
    """A T5 v1.1 encoder (``depth`` layers, width 1024) in ComfyUI's legacy scaled-fp8 layout."""
    import torch

    from mochi.models.t5 import T5Config, T5Encoder
    from mochi.weights.fp8 import quantize
    from mochi.weights.io import save_state_dict

    cfg = T5Config(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=depth)
    torch.manual_seed(0)
    t5 = T5Encoder(cfg)
    t5.initialize_weights()
    linears = {f"{n}.weight" for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {}
    for k, v in t5.state_dict().items():
        if k in linears:
            out[k], out[k.removesuffix("weight") + "scale_weight"] = quantize(v)
        else:
            out[k] = v.half()
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_state_dict(out, path)
    return path


def _write(folder: Path, model, layout: str) -> Path:  # noqa: ANN001 - an AsymmDiT
    """The checkpoint of ``model`` (bf16) in ``layout``; returns the path to load."""
    import torch

    from mochi.weights.fp8 import quantize
    from mochi.weights.io import save_state_dict

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout in ("q8_0", "q4_0"):
        from mochi.weights.convert import quantize_state_dict

        save_state_dict(quantize_state_dict(sd, layout.upper()), folder / f"dit_{layout}.safetensors")
        return folder / f"dit_{layout}.safetensors"
    if layout == "gguf":
        return _write_gguf(folder / "dit.gguf", sd)
    if layout == "genmo":
        save_state_dict(sd, folder / "dit.safetensors")
        return folder / "dit.safetensors"
    if layout == "diffusers":
        from mochi.weights.keymaps.dit_diffusers import diffusers_model

        diffusers_model(model).save_pretrained(folder / "transformer")
        return folder / "transformer"
    prefix, out = "model.diffusion_model.", {}  # ComfyUI's scaled fp8, legacy layout
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for k, v in sd.items():
        if k in linears:
            out[prefix + k], out[prefix + k.removesuffix("weight") + "scale_weight"] = quantize(v)
        else:
            out[prefix + k] = v
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_state_dict(out, folder / "dit_fp8.safetensors")
    return folder / "dit_fp8.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    layouts = ("genmo", "diffusers", "fp8", "q8_0", "q4_0", "gguf", "t5_fp8")
    p.add_argument("--layouts", nargs="+", choices=layouts, default=list(layouts))
    args = p.parse_args()
    import torch

    from mochi.memory.estimate import dit_weights
    from mochi.models.dit import AsymmDiT, DiTConfig

    cfg = DiTConfig(depth=args.depth, num_heads=8, hidden_size_x=1024, hidden_size_y=512, mlp_multiple_of=1)
    torch.manual_seed(0)
    model = AsymmDiT(cfg).to(torch.bfloat16).eval()
    for layout in args.layouts:
        with tempfile.TemporaryDirectory() as tmp:
            t5 = layout == "t5_fp8"
            path = (
                _write_t5_fp8(Path(tmp) / "t5.safetensors", args.depth)
                if t5
                else _write(Path(tmp), model, layout)
            )
            files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
            size = sum(f.stat().st_size for f in files)
            what = "T5" if t5 else "DiT"
            print(
                f"{what} {layout}: depth {args.depth}, width 1024, {size / MB:.0f} MB; "
                "peaks above the start, MB"
            )
            print(f"{'load':34s} {'private':>8s} {'resident':>9s} {'read':>6s}")
            for dtype in ("fp32",) if t5 else ("bf16", "fp32"):
                runs = {f"{dtype} whole, one process": _run(path, 1, dtype)[0]}
                for r, rank in enumerate(_run(path, args.ranks, dtype)):
                    runs[f"{dtype} shard, rank {r} of {args.ranks}"] = rank
                for name, m in runs.items():
                    print(f"{name:34s} {m['RssAnon'] / MB:8.0f} {m['VmRSS'] / MB:9.0f} {m['read'] / MB:6.0f}")
    full = dit_weights(DiTConfig(), torch.bfloat16)
    big = max(full.blocks)
    print(
        f"released DiT, bf16, 8 ranks: {full.total / 8 / 1e9:.2f} GB per rank "
        f"(1/8 of {full.total / 1e9:.2f} GB) instead of {full.total / 1e9:.2f} GB; "
        f"the largest block is {big / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()

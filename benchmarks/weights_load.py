"""Load time and peak memory of `load_dit` from each checkpoint format (CPU, the "small" preset by default).

Each case runs in a fresh process and reports the growth of its peak resident memory (VmHWM) over the
baseline after imports, through the load and a pass touching every weight, next to the size of the loaded
weights: a ratio near 1 means the weights existed once (meta build + assign), near 2 a second copy. File
pages that safetensors maps count as resident while they are read, so converting loads (fp32 file → bf16
weights) also count the file's pages (reclaimable page cache). "anon MB" is the anonymous memory the
load left behind (RssAnon), i.e. the copies the process really owns.

    PYTHONPATH=src python benchmarks/weights_load.py [--preset small] [--dir /tmp/mochi-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [
    # (name, checkpoint subpath, load_dit kwargs as source text)
    ("genmo fp32 → fp32", "genmo", "{}"),
    ("genmo fp32 → bf16", "genmo", "{'dtype': torch.bfloat16}"),
    ("diffusers fp32 (sharded) → fp32", "diffusers", "{}"),
    ("comfyui fp8_scaled, fp8 kept", "fp8.safetensors", "{}"),
    ("comfyui fp8_scaled, dequantized → bf16", "fp8.safetensors", "{'fp8': 'dequantize'}"),
]

CHILD = """
import time, torch, json
from mochi.weights.dit import load_dit
from mochi.weights.fp8 import parameter_bytes

def status(field):  # VmHWM (peak resident, starts afresh at exec, unlike ru_maxrss), RssAnon (not file pages)
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024

base, anon = status("VmHWM"), status("RssAnon")
t = time.perf_counter()
m = load_dit({path!r}, **{kwargs})
dt = time.perf_counter() - t
anon = status("RssAnon") - anon
for p in m.parameters():  # touch every weight: lazily mapped file pages count from here on
    p.float().sum()
grown = status("VmHWM") - base
print(json.dumps({{"seconds": dt, "grown": grown, "anon": anon, "weights": parameter_bytes(m)}}))
"""


def write_checkpoints(folder: Path, preset: str) -> None:
    import torch
    from safetensors.torch import save_file

    from mochi.models.dit import DIT_PRESETS, AsymmDiT
    from mochi.weights.convert import convert
    from mochi.weights.fp8 import quantize

    if (folder / "fp8.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    model = AsymmDiT(DIT_PRESETS[preset])
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    (folder / "genmo").mkdir(exist_ok=True)
    save_file(sd, folder / "genmo" / "dit.safetensors")
    convert(
        folder / "genmo", folder / "diffusers", to="diffusers", max_shard_bytes=200 * 10**6, overwrite=True
    )
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fp8 = {}
    for k, v in sd.items():
        if k in linears:
            q, s = quantize(v)
            fp8[f"model.diffusion_model.{k}"] = q
            fp8[f"model.diffusion_model.{k.removesuffix('.weight')}.scale_weight"] = s
        else:
            fp8[f"model.diffusion_model.{k}"] = v.to(torch.bfloat16)
    fp8["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(fp8, folder / "fp8.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mochi-weights-bench")
    args = parser.parse_args()
    folder = args.dir / args.preset
    write_checkpoints(folder, args.preset)
    print(f"preset {args.preset}; checkpoints in {folder}")
    print(f"{'case':<42} {'load s':>7} {'weights MB':>11} {'peak growth MB':>15} {'ratio':>6} {'anon MB':>8}")
    for name, sub, kwargs in CASES:
        code = CHILD.format(path=str(folder / sub), kwargs=kwargs)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        w, g = r["weights"] / 1e6, r["grown"] / 1e6
        print(f"{name:<42} {r['seconds']:>7.2f} {w:>11.1f} {g:>15.1f} {g / w:>6.2f} {r['anon'] / 1e6:>8.1f}")


if __name__ == "__main__":
    main()

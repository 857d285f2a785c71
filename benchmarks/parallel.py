"""1 vs 2 processes on this machine (gloo, CPU): DiT step time, per-rank memory, communication per step.

For each config (the "tiny" DiT preset and the "small" one: 4 blocks, 8 heads, width 1024) and each launch
(one plain process; 2 ranks with replicated weights; 2 ranks with FSDP2-sharded weights) it times one
denoising step (a guided DiT forward, batch 2 = [cond, uncond], 77 + 0 text tokens) and one LoRA training
step (forward + backward + gradient average, batch 1), and records per rank: parameter bytes held, peak
RSS, and the bytes each rank sent per step through the ``mochi.parallel.comm`` wrappers (all-to-all,
all-gather, all-reduce) plus FSDP's weight all-gathers (estimated: (G−1)/G of the parameter bytes per
forward, twice per training step).

Each rank uses 1 thread. The machine has 2 cores shared with other work: figures are noisy, and 2 ranks
on 2 shared cores measure overheads more than speedup. docs/parallel.md turns them into N-GPU estimates.

    PYTHONPATH=src python benchmarks/parallel.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT

ROOT = Path(__file__).resolve().parents[1]
# Latent (frames, height, width) per config: 3·4·4 = 48 and 7·12·16 = 1344 tokens after 2×2 patches.
LATENTS = {"tiny": (3, 8, 8), "small": (7, 24, 32)}
LAUNCHES = (
    ("1 process", 1, "replicate"),
    ("2 ranks, replicate", 2, "replicate"),
    ("2 ranks, shard", 2, "shard"),
)


def _inputs(name: str, batch: int):
    cfg = DIT_PRESETS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 12, *LATENTS[name], generator=g)
    text = torch.randn(batch, 77, cfg.t5_feat_dim, generator=g)
    mask = torch.zeros(batch, 77, dtype=torch.bool)
    mask[0] = True  # [prompt of 77 tokens, empty negative prompt]
    sigma = torch.full((batch,), 0.5)
    return x, sigma, text, mask


def _worker(name: str, weights: str, repeats: int) -> dict:
    torch.set_num_threads(1)
    from mochi.models.lora import add_trainable_lora
    from mochi.parallel import comm
    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.fsdp import parameter_bytes, shard_dit
    from mochi.parallel.sequence import enable_sequence_parallel

    world = init_world("cpu")
    torch.manual_seed(0)
    dit = AsymmDiT(DIT_PRESETS[name]).requires_grad_(False)
    add_trainable_lora(dit, 16)
    full_bytes = parameter_bytes(dit)
    if world is not None and world.size > 1:
        enable_sequence_parallel(dit)
        if weights == "shard":
            shard_dit(dit, world)
    size = 1 if world is None else world.size
    fsdp_gather = (size - 1) * full_bytes // size if weights == "shard" and size > 1 else 0
    lora = [p for p in dit.parameters() if p.requires_grad]

    def infer() -> None:
        with torch.no_grad():
            dit(*_inputs(name, 2))

    def train() -> None:
        for p in lora:
            p.grad = None
        x, sigma, text, mask = _inputs(name, 1)
        dit(x, sigma, text, mask).square().mean().backward()
        if size > 1:
            comm.average_grads(lora)

    out = {"params_bytes": parameter_bytes(dit), "full_params_bytes": full_bytes}
    for key, fn, gathers in (("infer", infer, 1), ("train", train, 2)):
        fn()  # warm-up
        comm.reset_traffic()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[f"{key}_s"] = min(times)
        sent = {k: v // repeats for k, v in comm.traffic.items()}
        if fsdp_gather:
            sent["fsdp_all_gather"] = gathers * fsdp_gather
        out[f"{key}_sent"] = sent
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if world is not None:
        close_world()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(name: str, nproc: int, weights: str, repeats: int) -> list[dict]:
    call = f"b._worker({name!r}, {weights!r}, {repeats})"
    code = f"import json, benchmarks.parallel as b; print('RESULT', json.dumps({call}))"
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
        if nproc > 1:
            env.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            )  # fmt: skip
        else:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                env.pop(k, None)
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE)
        )
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"{name} {nproc} ranks {weights}: a rank exited {p.returncode}")
        line = next(x for x in stdout.decode().splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


def _mb(n: float) -> str:
    return f"{n / 2**20:8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--json", help="write all figures here")
    args = parser.parse_args()
    table = {}
    print(f"{'config':6} {'launch':20} {'infer s':>8} {'train s':>8} {'params MiB':>10} {'RSS MiB':>8} "
          f"{'sent/infer MiB':>14} {'sent/train MiB':>14}")  # fmt: skip
    for name in args.configs.split(","):
        for label, nproc, weights in LAUNCHES:
            ranks = _launch(name, nproc, weights, args.repeats)
            table[f"{name}/{label}"] = ranks
            r = ranks[0]
            infer = max(x["infer_s"] for x in ranks)
            train = max(x["train_s"] for x in ranks)
            print(
                f"{name:6} {label:20} {infer:8.3f} {train:8.3f} {_mb(r['params_bytes']):>10} "
                f"{_mb(max(x['peak_rss_bytes'] for x in ranks)):>8} {_mb(sum(r['infer_sent'].values())):>14} "
                f"{_mb(sum(r['train_sent'].values())):>14}"
            )
    for key, ranks in table.items():
        print(key, "rank 0 sent per step:", {k: ranks[0][k] for k in ("infer_sent", "train_sent")})
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()

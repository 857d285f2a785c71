"""Block offload, ours vs diffusers' ``apply_group_offloading``: same weights, same inputs, one process.

    PYTHONPATH=src python benchmarks/memory_vs_diffusers_offload.py [--depth 4] [--latent 2 16 16]

Both DiTs hold the same tensors (``--depth`` blocks of the released widths, or ``--width``; random
weights; diffusers' ``MochiTransformer3DModel`` through our key map) in host memory and stream their
blocks through the device one at a time: ours with ``--offload blocks:0`` (``mochi.offload``: one block
per group, the next prefetched), diffusers' with ``apply_group_offloading(offload_type="block_level",
num_blocks_per_group=1)``, with ``use_stream=True`` on CUDA (its prefetch). The guidance batch (B=2: a
prompt and the empty negative prompt) runs one forward after a warm-up; time is the best of ``--repeats``.

Memory, on CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the forward
(resident weights, streamed blocks and activations). On the CPU no device memory exists: the figure is
the peak of live tensors created during the forward (a dispatch mode, ``mochi.memory.trace.LiveBytes``).
There neither side copies a block: the CPU holds the host masters, so our streamer runs each block from
its master (only its bookkeeping runs; ``offloaded(..., copy=True)`` would force host-to-host copies) as
diffusers' onload to the CPU moves nothing. Both rows are then the activations alone, and the
"activations only" row (both models without offload) shows it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from diffusers.hooks import apply_group_offloading

from mochi.memory.trace import LiveBytes
from mochi.models.dit import AsymmDiT, DiTConfig
from mochi.offload import Offload, offloaded
from mochi.weights.keymaps.dit_diffusers import diffusers_model

MB = 2**20


def _peak(fn, device: torch.device) -> tuple[torch.Tensor, int]:  # noqa: ANN001
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    with LiveBytes() as live:
        out = fn()
    return out, live.peak


def _best(fn, repeats: int, device: torch.device) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=3072, help="visual width (3072, released; text width half)")
    p.add_argument("--latent", type=int, nargs=3, default=(2, 16, 16), metavar=("T", "H", "W"))
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    cfg = DiTConfig(depth=args.depth, num_heads=args.width // 128, hidden_size_x=args.width)
    if args.width != 3072:  # diffusers' SwiGLU width rule at other widths (DIT_PRESETS["small"])
        cfg = replace(cfg, hidden_size_y=args.width // 2, mlp_multiple_of=1)
    ours = AsymmDiT(cfg).eval().requires_grad_(False).to(dtype)
    theirs = diffusers_model(ours).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, *args.latent, generator=g).to(device, dtype)
    text = torch.randn(2, 256, 4096, generator=g).to(device, dtype)
    mask = torch.zeros(2, 256, dtype=torch.bool, device=device)
    mask[0, :64] = True  # a 64-token prompt; row 1 is the empty negative prompt
    sigma = torch.full((2,), 0.5, device=device)
    block = sum(t.numel() * t.element_size() for t in ours.blocks[0].parameters())
    print(
        f"device {device}, {args.dtype}, {args.depth} blocks of {block / MB:.0f} MB, "
        f"latent {tuple(args.latent)}"
    )

    def run_ours():  # noqa: ANN202
        return ours(x, sigma, text, mask)

    def run_theirs():  # noqa: ANN202
        return theirs(x, text, (1 - sigma) * 1000, mask, return_dict=False)[0]

    rows = {}
    if device.type == "cpu":
        rows["activations only (no offload)"] = (
            _peak(run_ours, device)[1],
            _peak(run_theirs, device)[1],
            0,
            0,
        )
    with offloaded(ours, device, Offload("blocks", 0)):
        run_ours()  # warm-up; afterwards the first block is prefetched, as in every later denoising step
        a, mem_ours = _peak(run_ours, device)
        t_ours = _best(run_ours, args.repeats, device)
    apply_group_offloading(
        theirs,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device.type == "cuda",
    )
    run_theirs()
    b, mem_theirs = _peak(run_theirs, device)
    t_theirs = _best(run_theirs, args.repeats, device)
    rows["block offload, 1 block per group"] = (mem_ours, mem_theirs, t_ours, t_theirs)
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    print(
        f"{'':34s} {'ours MB':>8s} {'diff MB':>8s} {'mem x':>6s} {'ours s':>7s} {'diff s':>7s} {'time x':>6s}"
    )
    for name, (mo, mt, to, tt) in rows.items():
        times = f"{to:7.2f} {tt:7.2f} {to / tt:6.2f}" if to else ""
        print(f"{name:34s} {mo / MB:8.1f} {mt / MB:8.1f} {mo / mt:6.2f} {times}")
    print(f"outputs: relative difference {err:.1e} (the two implementations, not the offload)")


if __name__ == "__main__":
    main()

"""Our AsymmDiT forward vs diffusers' MochiTransformer3DModel: same weights, same inputs, one process.

Cases: fp32 and bf16; B=1 (one prompt) and the guidance batch B=2 (the prompt + an empty negative prompt,
which has zero valid tokens, as in Genmo's reference). Two model sizes: a small DiT (``--preset``, default
"small": 4 blocks, width 1024/512, 8 heads) and the real block widths (3072/1536, 24 heads) with
``--fw-depth`` blocks.

Printed per case:
* time: best of ``--repeats`` forwards after a warm-up, ours and diffusers' interleaved so that load from
  other processes hits both alike; speed-up = diffusers' time / ours. On a shared, busy host,
  ``--threads 1 --clock cpu`` (process CPU time of one thread) is far steadier than wall time.
* peak memory: the peak bytes of live tensors created during one forward (weights and inputs excluded),
  counted exactly by ``mochi.memory.trace.LiveBytes``, a TorchDispatchMode that tracks every op's new output
  storages until they are freed (views of the inputs, which ours takes and diffusers' does not, are not new
  storage: the tracker used before counted them, charging ours the text input, 8 MB at B=1 fp32). It
  works on CPU, is deterministic and ignores the allocator's caching (which makes RSS-based deltas unreliable
  within one process); kernel-internal scratch buffers are not seen.
* FLOPs of our forward counted from the config (matmuls and attention, valid tokens only), the throughput
  they imply and its fraction of this machine's matmul peak, measured in the same run as the best time of a
  plain ``--gemm-n``³ GEMM in the same dtype. "FLOP x" is diffusers' FLOPs over ours (it runs the text stream
  and the pooler over all padded tokens): the speed-up both would have at equal efficiency.

Example (about 4 minutes on 2 shared cores): ``PYTHONPATH=src python benchmarks/dit_vs_diffusers.py``
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import diffusers
import torch
from measure import at_least  # a sibling script module

from mochi.memory.trace import LiveBytes
from mochi.models.dit import DIT_PRESETS, AsymmDiT, DiTConfig
from mochi.weights.keymaps.dit_diffusers import diffusers_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def forward_flops(
    cfg: DiTConfig, frames: int, height: int, width: int, text_lens: list[int], stream_len: int | None = None
) -> int:
    """Multiply-add FLOPs (2 per MAC) of a forward: every matmul and both attention products.

    Ours runs the text stream and the pooler on the valid tokens only; ``stream_len`` counts them over that
    many (padded) tokens per sample instead, as diffusers does (its attention still takes valid tokens only).
    """
    dx, dy, d5, p = cfg.hidden_size_x, cfg.hidden_size_y, cfg.t5_feat_dim, cfg.patch_size
    hx, hy = cfg.mlp_hidden(dx, cfg.mlp_ratio_x), cfg.mlp_hidden(dy, cfg.mlp_ratio_y)
    n = frames * (height // p) * (width // p)
    macs = 0
    for valid in text_lens:
        L = valid if stream_len is None else stream_len
        macs += n * dx * cfg.in_channels * p * p  # patch embedding
        macs += cfg.timestep_embed_dim * dx + dx * dx  # timestep MLP
        macs += (L + 1) * d5 * 2 * d5 + d5 * d5 + d5 * dx + 2 * (L + 1) * d5  # attention pool
        macs += L * d5 * dy  # text projection
        for i in range(cfg.depth):
            update_y = i < cfg.depth - 1
            macs += dx * 4 * dx + dx * (4 * dy if update_y else dy)  # modulation
            macs += n * dx * 3 * dx + L * dy * 3 * dx  # qkv
            macs += 2 * (n + valid) ** 2 * dx  # q·kᵀ and p·v
            macs += n * dx * dx + n * 3 * dx * hx  # proj_x, mlp_x
            if update_y:
                macs += L * dx * dy + L * 3 * dy * hy  # proj_y, mlp_y
        macs += dx * 2 * dx + n * dx * p * p * cfg.in_channels  # final layer
    return 2 * macs


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn, clock=time.perf_counter) -> float:  # noqa: ANN001
    start = clock()
    fn()
    return clock() - start


def build(cfg: DiTConfig) -> tuple[AsymmDiT, torch.nn.Module]:
    """Ours with random weights, and diffusers' model holding the same weights through the key map."""
    torch.manual_seed(0)
    ours = AsymmDiT(cfg).eval()
    return ours, diffusers_model(ours)


def run_size(name: str, cfg: DiTConfig, shape: tuple[int, int, int], args: argparse.Namespace) -> None:
    frames, height, width = shape
    ours, ref = build(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, frames, height, width, generator=g)
    text = torch.randn(2, args.text_len, cfg.t5_feat_dim, generator=g)
    mask = torch.zeros(2, args.text_len, dtype=torch.bool)
    mask[0, : args.prompt_len] = True  # the prompt; row 1 is the empty negative prompt
    sigma = torch.full((2,), 0.5)
    for dname in sorted(args.dtypes.split(","), key=list(DTYPES).index):  # fp32 before the lossy cast
        dtype = DTYPES[dname]
        ours.to(dtype)
        ref.to(dtype)
        ga, gb = (torch.randn(args.gemm_n, args.gemm_n, dtype=dtype) for _ in range(2))
        for b in (1, 2):
            inp = (x[:b].to(dtype), sigma[:b], text[:b].to(dtype), mask[:b])
            fns = {
                "ours": lambda inp=inp: ours(*inp),
                "ref": lambda inp=inp: ref(inp[0], inp[2], (1 - inp[1]) * 1000, inp[3], return_dict=False)[0],
                "gemm": lambda: ga @ gb,  # noqa: B023 - called within this iteration
            }
            with torch.inference_mode():
                a, r = fns["ours"]().float(), fns["ref"]().float()
                err = ((a - r).norm() / r.norm()).item()
                fns["gemm"]()
                times = {k: [] for k in fns}
                for _ in range(args.repeats):
                    for k, fn in fns.items():
                        times[k].append(_timed(fn, CLOCKS[args.clock]))
                mem = {}
                for k in ("ours", "ref"):
                    with LiveBytes() as tracker:
                        fns[k]()
                    mem[k] = tracker.peak
            best = {k: min(v) for k, v in times.items()}
            gflop = forward_flops(cfg, frames, height, width, [args.prompt_len, 0][:b]) / 1e9
            ceiling = (
                forward_flops(cfg, frames, height, width, [args.prompt_len, 0][:b], args.text_len)
                / 1e9
                / gflop
            )
            achieved, peak = gflop / best["ours"], 2 * args.gemm_n**3 / best["gemm"] / 1e9
            print(
                f"{name:<12} {dname:<5} {b:>1} | {best['ours']:7.3f} {best['ref']:7.3f} "
                f"{best['ref'] / best['ours']:7.2f}× | {mem['ours'] / 2**20:8.1f} {mem['ref'] / 2**20:8.1f} "
                f"{mem['ours'] / mem['ref']:9.2f} | {gflop:7.1f} {achieved:9.1f} {peak:9.1f} "
                f"{achieved / peak:7.0%} {ceiling:8.2f}× | {err:7.1e}",
                flush=True,
            )


HEADER = (
    f"{'size':<12} {'dtype':<5} {'B':>1} | {'ours s':>7} {'diff s':>7} {'speed-up':>8} | "
    f"{'ours MB':>8} {'diff MB':>8} {'mem ratio':>9} | {'GFLOP':>7} {'ours GF/s':>9} {'GEMM GF/s':>9} "
    f"{'of peak':>7} {'FLOP x':>9} | {'rel err':>7}"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(DIT_PRESETS), help="the small model")
    ap.add_argument("--shape", default="7,30,30", help="latent frames,height,width for the small model")
    ap.add_argument("--fw-depth", type=int, default=2, help="blocks of the full-width model (0 skips it)")
    ap.add_argument("--fw-shape", default="3,24,24", help="latent frames,height,width at full width")
    ap.add_argument("--prompt-len", type=int, default=77, help="valid tokens of the prompt")
    ap.add_argument("--text-len", type=int, default=256, help="padded T5 length")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per case (the best is kept)")
    ap.add_argument("--gemm-n", type=int, default=3072, help="size of the square GEMM that measures the peak")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="cpu: process CPU time, steadier on a busy host",
    )
    args = ap.parse_args()
    at_least(ap, ("--repeats", args.repeats, 1))
    if not 0 <= args.prompt_len <= args.text_len:
        ap.error(f"--prompt-len {args.prompt_len}: must be in [0, --text-len {args.text_len}]")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="In CPU autocast")
    diffusers.utils.logging.set_verbosity_error()  # its advice on casting with .to() is about its loader
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"time = best of {args.repeats}, {args.clock} clock"
    )
    print(HEADER)
    run_size(args.preset, DIT_PRESETS[args.preset], _shape(args.shape), args)
    if args.fw_depth:
        full = replace(DIT_PRESETS["mochi-1-preview"], depth=args.fw_depth)
        run_size(f"full-width-{args.fw_depth}", full, _shape(args.fw_shape), args)


def _shape(text: str) -> tuple[int, int, int]:
    frames, height, width = (int(v) for v in text.split(","))
    return frames, height, width


if __name__ == "__main__":
    main()

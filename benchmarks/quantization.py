"""Velocity error, weight memory and speed of each weight quantization on the released block widths.

A ``full-width-2`` DiT (2 blocks at the released widths: 3072/1536, 24 heads, random weights from
``initialize_weights``) in bf16 is the reference; each mode quantizes a copy (``quantize_model``: the blocks'
Linear layers) and runs the same forwards in bf16. Printed per mode: the velocity's relative L2 error
against bf16 (mean over ``--inputs`` random inputs, and the worst), its cosine similarity, the error of
bf16 itself against fp32 for scale, the bytes the weights hold (measured from the tensors: int8 data and
scales for torchao, uint8 blocks for q8_0/q4_0) and per quantized parameter, and the forward time.

    PYTHONPATH=src python benchmarks/quantization.py [--inputs 3] [--frames 2 --size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT, DiTConfig
from mochi.models.t5 import T5Config, T5Encoder
from mochi.weights.quantize import MODES, quantize_model, stored_bytes, weight_bytes


def released_table() -> None:
    """Weight memory of the released DiT (bf16 compute) and T5-XXL encoder (fp32) per mode, built on the
    meta device: tensor sizes only, nothing allocated or downloaded."""
    with torch.device("meta"):
        dit, t5 = AsymmDiT(DiTConfig()), T5Encoder(T5Config())
    print("released weights (meta-device accounting):")
    print(f"{'mode':<6} {'DiT GiB':>8} {'B/param':>8} {'quantized':>9} | {'T5 GiB':>7} {'B/param':>8}")
    for mode in (None, *MODES):
        d, t = weight_bytes(dit, mode, torch.bfloat16), weight_bytes(t5, mode, torch.float32)
        print(
            f"{mode or 'none':<6} {d['total'] / 2**30:8.2f} {d['total'] / d['params']:8.4f} "
            f"{d['quantized_params'] / d['params']:9.1%} | "
            f"{t['total'] / 2**30:7.2f} {t['total'] / t['params']:8.4f}"
        )


def inputs(cfg, n: int, frames: int, size: int, text_len: int = 64, valid: int = 40) -> list[tuple]:  # noqa: ANN001
    """``n`` (x, sigma, text, mask) tuples of latents (1, 12, frames, size, size) and a 40-token prompt."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for i in range(n):
        x = torch.randn(1, cfg.in_channels, frames, size, size, generator=g)
        text = torch.randn(1, text_len, cfg.t5_feat_dim, generator=g)
        mask = torch.zeros(1, text_len, dtype=torch.bool)
        mask[0, :valid] = True
        out.append((x, torch.tensor([0.2 + 0.6 * i / max(n - 1, 1)]), text, mask))
    return out


def run(model: AsymmDiT, batch: list[tuple], dtype: torch.dtype) -> tuple[list[torch.Tensor], float]:
    """Velocities (fp32) for every input and the median forward time in seconds."""
    outs, times = [], []
    with torch.inference_mode():
        for x, sigma, text, mask in batch:
            t0 = time.perf_counter()
            outs.append(model(x.to(dtype), sigma, text.to(dtype), mask).float())
            times.append(time.perf_counter() - t0)
    return outs, sorted(times)[len(times) // 2]


def errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float, float]:
    rel = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    cos = [
        torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0).item()
        for g, w in zip(got, want)
    ]
    return sum(rel) / len(rel), max(rel), min(cos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=3, help="random inputs per mode (errors are averaged)")
    parser.add_argument("--frames", type=int, default=2, help="latent frames")
    parser.add_argument(
        "--size", type=int, default=16, help="latent height and width (tokens: (size/2)²·frames)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    released_table()

    torch.manual_seed(0)
    model = AsymmDiT(DIT_PRESETS["full-width-2"]).eval().requires_grad_(False)
    batch = inputs(model.config, args.inputs, args.frames, args.size)
    fp32, _ = run(model, batch, torch.float32)
    model.to(torch.bfloat16)
    bf16, t_bf16 = run(model, batch, torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    base = stored_bytes(model)
    mean, worst, cos = errors(bf16, fp32)
    tokens = args.frames * (args.size // 2) ** 2
    print(
        f"full-width-2 DiT, {n_params:,} parameters, {args.inputs} inputs of {tokens} visual + 40 text "
        f"tokens, {args.threads} thread(s)"
    )
    print(f"{'mode':<6} {'rel err':>9} {'worst':>9} {'min cos':>9} | {'weights MB':>10} {'B/param':>8} "
          f"{'B/quantized param':>17} | {'forward s':>9} {'x bf16':>7}")  # fmt: skip
    print(
        f"{'bf16':<6} {mean:9.2e} {worst:9.2e} {cos:9.6f} | {base / 2**20:10.1f} {base / n_params:8.3f} "
        f"{'':>17} | {t_bf16:9.3f} {1:7.2f}   (bf16 vs fp32: the reference's own rounding)"
    )
    for mode in args.modes.split(","):
        q = copy.deepcopy(model)
        report = quantize_model(q, mode)
        got, t = run(q, batch, torch.bfloat16)
        mean, worst, cos = errors(got, bf16)
        size = stored_bytes(q)
        layers = [q.get_submodule(n) for n in report.layers]
        qparams = sum(m.in_features * m.out_features for m in layers)
        qbytes = size - (base - sum(2 * m.in_features * m.out_features for m in layers))
        print(
            f"{mode:<6} {mean:9.2e} {worst:9.2e} {cos:9.6f} | {size / 2**20:10.1f} {size / n_params:8.3f} "
            f"{qbytes / qparams:17.4f} | {t:9.3f} {t / t_bf16:7.2f}",
            flush=True,
        )
        del q


if __name__ == "__main__":
    main()

"""The tables of docs/memory.md: estimated peak per stage of the released model, and which cards it fits.

    PYTHONPATH=src python benchmarks/memory_table.py

For 848×480 at 31, 85 and 163 frames (batched guidance: DiT batch 2), every weight quantization and
offload setting: the peak of the text, denoise and decode stages (GB = 10⁹ bytes, 1 GB CUDA reserve
included), with the decode planned for a 24 GB card, and the cards (8, 12, 16, 24, 48, 80 GB) each fits,
each card planned on its own (block offload with the most resident blocks that fit it). Estimates only
(mochi.memory.planner); nothing is allocated.
"""

from __future__ import annotations

from mochi.memory.estimate import QUANT_MODES
from mochi.memory.planner import CUDA_RESERVE, GB, Job, Models, plan, stage_peaks
from mochi.offload import Offload

CARDS = (8, 12, 16, 24, 48, 80)


def main() -> None:
    import torch

    models = Models()
    for frames in (31, 85, 163):
        job = Job.from_request(frames, 480, 848)
        print(f"\n### {frames} frames (latent {job.latent})\n")
        print("| weights | offload | text | denoise | decode (24 GB plan) | cards it fits |")
        print("| --- | --- | ---: | ---: | ---: | --- |")
        fits = {card: plan(models, job, card * GB, reserve=CUDA_RESERVE) for card in CARDS}
        for quant in QUANT_MODES:
            for mode in ("none", "model", "blocks"):
                offload = Offload("blocks", 0) if mode == "blocks" else Offload(mode)
                peaks, _ = stage_peaks(models, job, torch.bfloat16, quant, offload, 24 * GB, CUDA_RESERVE)
                cards = []
                for card, options in fits.items():
                    match = [o for o in options if o.quant == quant and o.offload.kind == mode]
                    if match and match[0].fits:
                        n = f" (N={match[0].offload.resident})" if mode == "blocks" else ""
                        cards.append(f"{card}{n}")
                name = "bf16" if quant == "none" else quant
                label = "blocks:N" if mode == "blocks" else mode
                p = {k: f"{v / GB:.1f}" for k, v in peaks.items()}
                print(
                    f"| {name} | {label} | {p['text']} | {p['denoise']} | {p['decode']} | "
                    f"{', '.join(cards) or 'none'} |"
                )


if __name__ == "__main__":
    main()

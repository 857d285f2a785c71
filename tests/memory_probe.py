"""Measured peak activation memory of small DiT, T5 and VAE runs on the CPU, for tests/test_memory_plan.py.

Run as its own process with MALLOC_MMAP_THRESHOLD_=65536 (every tensor buffer its own mmap, returned to
the OS when freed, so the resident set follows live tensors); the peak is VmHWM − VmRSS around the call,
the high-water mark reset first. Prints one JSON object {case: [measured, estimated]}.
"""

from __future__ import annotations

import gc
import json
import re

import torch

from mochi.memory.estimate import dit_activations, t5_activations
from mochi.models.dit import AsymmDiT, DiTConfig
from mochi.models.t5 import T5Config, T5Encoder
from mochi.models.vae import DECODER_PRESETS, ENCODER_PRESETS, Decoder, Encoder
from mochi.models.vae_memory import estimate_decode_memory, estimate_encode_memory
from mochi.models.vae_tiling import decode, encode

DIT = DiTConfig(
    depth=3, num_heads=4, hidden_size_x=512, hidden_size_y=256, t5_feat_dim=256, mlp_multiple_of=1
)
T5 = T5Config(vocab_size=512, d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_layers=3)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _peak(fn, repeats: int = 3) -> int:  # noqa: ANN001
    """The largest of ``repeats`` measurements: on a loaded machine the kernel may evict some of this
    process's file-backed pages during a call, which can only lower a measurement."""
    fn()  # warm up: one-time allocations (thread pools, kernels) are not activations
    peaks = []
    for _ in range(repeats):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        out = fn()
        peaks.append(_status("VmHWM") - base)
        del out
    return max(peaks)


@torch.inference_mode()
def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {}
    latent, batch, tokens = (2, 32, 32), 2, [20, 0]
    x = torch.randn(batch, 12, *latent)
    text = torch.randn(batch, 20, DIT.t5_feat_dim)
    mask = torch.zeros(batch, 20, dtype=torch.bool)
    mask[0] = True
    for name, dtype in (("dit fp32", torch.float32), ("dit bf16", torch.bfloat16)):
        dit = AsymmDiT(DIT).to(dtype).eval()
        measured = _peak(lambda dit=dit: dit(x, torch.tensor([0.5, 0.5]), text, mask))
        results[name] = [measured, dit_activations(DIT, latent, batch, tuple(tokens), dtype)]
    t5 = T5Encoder(T5).eval()
    ids = torch.randint(0, 512, (2, 256))
    results["t5"] = [_peak(lambda: t5(ids, torch.ones(2, 256, dtype=torch.bool))), t5_activations(T5, 2, 256)]
    # One latent frame at a time in fp32: short chunks of a narrow model take PyTorch's own conv kernel.
    dec, enc = Decoder(DECODER_PRESETS["tiny"]).eval(), Encoder(ENCODER_PRESETS["tiny"]).eval()
    shape, tile = (1, 4, 8, 8), (8, 8)
    z, video = torch.randn(1, 12, 4, 8, 8), torch.rand(1, 3, 19, 64, 64) * 2 - 1
    results["vae decode"] = [
        _peak(lambda: decode(dec, z, tile=tile, chunk=1)),
        estimate_decode_memory(dec.cfg, shape, tile, 1, cpu=True),
    ]
    results["vae encode"] = [
        _peak(lambda: encode(enc, video, tile=tile, chunk=1)),
        estimate_encode_memory(enc.cfg, shape, tile, 1, cpu=True),
    ]
    print(json.dumps(results))


if __name__ == "__main__":
    main()

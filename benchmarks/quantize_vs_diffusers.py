"""int8 weight-only DiT, ours vs diffusers' (torchao through ``TorchAoConfig``): same weights, one process.

A ``full-width-2`` DiT (released block widths, random weights) is written once in bf16 as Genmo's
``dit.safetensors`` and as a diffusers ``transformer/`` folder. Then, for each side, measured in this process:

* load: reading the bf16 checkpoint and quantizing it to int8 weight-only — ours
  ``load_dit_quantized(path, "int8")`` (what ``--quantize int8`` does: each layer quantized as it is
  read), diffusers'
  ``MochiTransformer3DModel.from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))``;
  time and peak private memory (RssAnon, sampled) above the value before it;
* weights: private memory (RssAnon) the quantized model keeps after loading; apart, the pages of the
  checkpoint file it still maps (RssFile: clean page cache the kernel may drop, which diffusers keeps
  mapped after its load and ours mostly does not) — counting them as weights, as this script once did,
  halved the ratios;
* forward: after one untimed warm-up forward, median time and peak memory above the resident set, for one
  prompt (40 valid of 256 text tokens);
* peak: the larger of the load peak and weights + forward peak — the private memory the process needs;
  also printed with the mapped file pages included (the resident set's high-water mark).

Two diffusers settings: ``matched`` leaves the same layers unquantized as we do (``modules_to_not_convert``:
time_embed, norm_out, proj_out — the conditioning path and the final layer), ``default`` quantizes every
Linear. Peak memory is read from the kernel (``benchmarks/measure.py``: the script re-runs itself with
glibc's mmap threshold at 64 KiB so that RSS follows live tensors).

    PYTHONPATH=src python benchmarks/quantize_vs_diffusers.py [--frames 2 --size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import gc
import tempfile
import warnings
from pathlib import Path

from measure import MB, _status, at_least, measure, private_peak, reexec_with_mmap_malloc

reexec_with_mmap_malloc()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mochi.models.dit import DIT_PRESETS, AsymmDiT  # noqa: E402
from mochi.weights.dit import load_dit, load_dit_quantized  # noqa: E402
from mochi.weights.keymaps.dit_diffusers import diffusers_model  # noqa: E402

NOT_CONVERTED = ["time_embed", "norm_out", "proj_out"]


def write_checkpoints(folder: Path) -> None:
    torch.manual_seed(0)
    model = AsymmDiT(DIT_PRESETS["full-width-2"]).eval().requires_grad_(False).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "dit.safetensors")
    diffusers_model(model).save_pretrained(folder / "transformer")


def ours_loaded(folder: Path) -> torch.nn.Module:
    return load_dit_quantized(folder / "dit.safetensors", "int8", dtype=torch.bfloat16)[0]


def theirs_loaded(folder: Path, matched: bool) -> torch.nn.Module:
    from diffusers import MochiTransformer3DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=NOT_CONVERTED if matched else None)
    return MochiTransformer3DModel.from_pretrained(
        folder / "transformer", quantization_config=config, torch_dtype=torch.bfloat16
    ).eval()


def side(name: str, load, forward, repeats: int) -> dict:  # noqa: ANN001
    gc.collect()
    before = {f: _status(f) for f in ("RssAnon", "RssFile")}
    (model, p_load_private), t_load, p_load = measure(lambda: private_peak(load))
    weights = _status("RssAnon") - before["RssAnon"]
    mapped = _status("RssFile") - before["RssFile"]
    with torch.inference_mode():
        forward(model)  # warm-up: each library's one-time costs stay out of the timed forwards
        out, t_fwd, p_fwd = measure(functools.partial(forward, model), repeats)
    peak = max(p_load_private, weights + p_fwd)
    resident = max(p_load, weights + mapped + p_fwd)
    print(
        f"{name:<18} load {t_load:6.2f} s, peak {p_load_private / MB:7.1f} MB | "
        f"weights {weights / MB:7.1f} MB "
        f"(+ {mapped / MB:6.1f} MB of mapped file) | forward {t_fwd:6.2f} s, peak {p_fwd / MB:6.1f} MB | "
        f"process peak {peak / MB:7.1f} MB (resident with mapped file pages {resident / MB:7.1f} MB)",
        flush=True,
    )
    result = {
        "t_load": t_load,
        "t_fwd": t_fwd,
        "peak": peak,
        "resident": resident,
        "weights": weights,
        "out": out.float(),
    }
    del model
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    at_least(parser, ("--frames", args.frames, 1), ("--size", args.size, 1), ("--repeats", args.repeats, 1))
    if args.size % 2:
        parser.error(f"--size {args.size}: the DiT's 2x2 patches need an even size; try {args.size + 1}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, args.frames, args.size, args.size, generator=g).to(torch.bfloat16)
    text = torch.randn(1, 256, 4096, generator=g).to(torch.bfloat16)
    mask = torch.zeros(1, 256, dtype=torch.bool)
    mask[0, :40] = True
    sigma = torch.tensor([0.5])

    def ours_forward(m):  # noqa: ANN001, ANN202
        return m(x, sigma, text, mask)

    def theirs_forward(m):  # noqa: ANN001, ANN202
        return m(x, text, (1 - sigma) * 1000, mask, return_dict=False)[0]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoints(folder)
        gc.collect()
        tokens = args.frames * (args.size // 2) ** 2
        print(
            f"full-width-2 DiT, bf16 checkpoint → int8 weight-only; {tokens} visual tokens, "
            f"{args.threads} thread(s)"
        )
        ref = load_dit(folder / "dit.safetensors", dtype=torch.bfloat16)
        with torch.inference_mode():
            want = ref(x, sigma, text, mask).float()
        del ref
        ours = side("ours", lambda: ours_loaded(folder), ours_forward, args.repeats)
        results = {
            setting: side(
                f"diffusers {setting}", lambda m=m: theirs_loaded(folder, m), theirs_forward, args.repeats
            )
            for setting, m in (("matched", True), ("default", False))
        }
    for setting, theirs in results.items():
        print(
            f"ours / diffusers {setting:<8}: process peak {ours['peak'] / theirs['peak']:5.2f}, "
            f"weights {ours['weights'] / theirs['weights']:5.2f}, "
            f"resident with mapped file pages {ours['resident'] / theirs['resident']:5.2f}, "
            f"load time {ours['t_load'] / theirs['t_load']:5.2f}, "
            f"forward time {ours['t_fwd'] / theirs['t_fwd']:5.2f}"
        )
    for name, r in (("ours", ours), *((f"diffusers {s}", r) for s, r in results.items())):
        err = ((r["out"] - want).norm() / want.norm()).item()
        print(f"velocity error vs unquantized bf16, {name:<18}: {err:.2e}")


if __name__ == "__main__":
    main()

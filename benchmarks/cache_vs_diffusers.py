"""Step caching and compile, ours vs diffusers' hooks, in one process on the same weights (issue 16).

    PYTHONPATH=src python benchmarks/cache_vs_diffusers.py quality [--seeds 4] [--seed 100] [--threads 1]
        [--teacache 0.05,0.1,0.2] [--fbcache 0.1,0.2] [--ours "teacache:2x;fbcache,extrapolate@0.18"]
        [--diffusers-fbc 0.1,0.2] [--magcache 0.06,0.12]
    PYTHONPATH=src python benchmarks/cache_vs_diffusers.py compile [--threads 1] [--repeats 3]

quality: the embedded model's DiT, and diffusers' ``MochiTransformer3DModel`` holding the same tensors
(``diffusers_model``), each drive the same sampler (our Euler loop, schedule, batched guidance) over the
prompts of ``benchmarks/adherence.py`` (every colour, shape and direction, and every held-out composition)
at ``--seeds`` seeds (repeat r uses seed SEED + r, prompt i of a batch of 8 adds i). Per setting: DiT
forwards per trajectory (full passes that reached the last block; a batched CFG forward counts once), the
DiT's seconds per trajectory (the denoiser calls only; decode excluded), the speed-up over the same
implementation uncached, the frame PSNR against that uncached video (same seed; the mean over the videos that
differ from it, the identical ones, whose PSNR is infinite, counted in column "same") and the
pixel judge's adherence pooled over all seeds. Ours: TeaCache with the embedded model's shipped calibration
(``mochi/assets/mochi-tiny.teacache.json``, fitted on seeds 0-7 of four other prompts), first-block cache.
Diffusers: FirstBlockCache, MagCache (calibrated first with ``MagCacheConfig(calibrate=True)`` on one
trajectory of the calibration prompts, as its docs say) and FasterCache (its documented example settings,
timestep callback = σ·1000 as diffusers' MochiPipeline sets it, batch reordered to its [uncond, cond]).

compile: seconds per DiT forward (guided batch of 2, 77 + 0 text tokens) eager vs ``compile_dit`` at the
``small`` and ``full-width-2`` sizes, fp32 and bf16, with the compile time of the first call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mochi.accel.cache import CacheSetting, StepCache
from mochi.accel.calibrate import coefficients_path, load_coefficients
from mochi.sampling.schedules import linear_quadratic_schedule
from mochi.train import shapes
from mochi.train.evaluate import generate
from mochi.train.judge import psnr, score
from mochi.weights.bundle import load_embedded
from mochi.weights.keymaps.dit_diffusers import diffusers_model

CALIBRATION_PROMPTS = ("a red circle moving right", "a blue square moving up on a gray background")


class Counted:
    """A denoiser wrapper: the seconds spent in the denoiser and the trajectories it served (a new one
    begins when σ does not fall)."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.model, self.seconds, self.trajectories, self._sigma = model, 0.0, 0, None

    def __call__(self, x, sigma, text, mask):  # noqa: ANN001, ANN204
        s = float(sigma.max())
        if self._sigma is None or s >= self._sigma:
            self.trajectories += 1
            reset = getattr(self.model, "reset", None)
            if reset is not None:
                reset()
        self._sigma = s
        t0 = time.perf_counter()
        out = self.model(x, sigma, text, mask)
        self.seconds += time.perf_counter() - t0
        return out


class DiffusersDenoiser:
    """diffusers' transformer as our denoiser: timestep (1 − σ)·1000, a guided batch reordered from our
    [cond, uncond] to diffusers' [uncond, cond], called inside its ``cache_context`` as its pipeline does."""

    def __init__(self, transformer) -> None:  # noqa: ANN001
        self.transformer, self.timestep = transformer, None

    def reset(self) -> None:
        self.transformer._reset_stateful_cache()

    def __call__(self, x, sigma, text, mask):  # noqa: ANN001, ANN204
        self.timestep = float(sigma.max()) * 1000  # diffusers' MochiPipeline: _current_timestep = 1000 − t
        b = x.shape[0] // 2
        swap = (lambda t: torch.cat([t[b:], t[:b]])) if x.shape[0] % 2 == 0 else (lambda t: t)
        with self.transformer.cache_context("cond_uncond"):
            out = self.transformer(
                hidden_states=swap(x),
                encoder_hidden_states=swap(text),
                timestep=swap((1 - sigma) * 1000),
                encoder_attention_mask=swap(mask),
                return_dict=False,
            )[0]
        return swap(out)


def last_block_counter(block: torch.nn.Module, leaf: torch.nn.Module) -> list[int]:
    """Counts the forwards that reached ``leaf`` (an MLP inside the last block): full passes."""
    count = [0]
    leaf.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def run_setting(components, denoiser, prompts, args) -> tuple[np.ndarray, float, int]:  # noqa: ANN001
    counted = Counted(denoiser)
    comps = dataclasses.replace(components, dit=counted)
    videos = np.concatenate(
        [generate(comps, prompts, seed=args.seed + r, steps=args.steps) for r in range(args.seeds)]
    )
    return videos, counted.seconds / counted.trajectories, counted.trajectories


def magcache_ratios(components, transformer, steps: int) -> list[float]:
    """MagCache's calibration run (``calibrate=True``), as its docs say: the ratios it prints."""
    from diffusers import MagCacheConfig

    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    comps = dataclasses.replace(components, dit=DiffusersDenoiser(transformer))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate(comps, list(CALIBRATION_PROMPTS), seed=0, steps=steps)
    transformer.disable_cache()
    found = re.findall(r"\[([-0-9.e, ]+)\]", printed.getvalue())
    return [float(v) for v in found[-1].split(",")]


def quality(args: argparse.Namespace) -> None:
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig

    components = load_embedded()
    dit = components.dit
    steps = args.steps or components.defaults["steps"]
    sigmas = linear_quadratic_schedule(steps)
    coefficients = load_coefficients(coefficients_path(components.source), dit.config)
    transformer = diffusers_model(dit)
    ours_count = last_block_counter(dit.blocks[-1], dit.blocks[-1].mlp_x)
    theirs_count = last_block_counter(
        transformer.transformer_blocks[-1], transformer.transformer_blocks[-1].ff
    )
    prompts = (shapes.eval_prompts() + shapes.heldout_prompts())[: args.limit or None]
    wrapper = DiffusersDenoiser(transformer)

    def ours(name: str, threshold: float | None):  # noqa: ANN202
        if name == "none":
            return dit
        setting = CacheSetting.parse(name, threshold)
        cache = StepCache(dit, setting, coefficients=coefficients, sigmas=sigmas)
        cache.reset = lambda: None  # StepCache starts a new trajectory by itself when σ rises
        return cache

    def theirs(config) -> DiffusersDenoiser:  # noqa: ANN001
        transformer.disable_cache() if transformer.is_cache_enabled else None
        if config is not None:
            transformer.enable_cache(config)
        return wrapper

    need_ratios = args.impl != "ours" and (not args.only or any("MagCache" in o for o in args.only))
    ratios = magcache_ratios(components, transformer, steps) if need_ratios else []
    if ratios:
        print(f"MagCache calibration ratios ({len(ratios)} steps): {[round(r, 4) for r in ratios]}")
    settings = [("ours", "uncached", lambda: ours("none", 0))]
    settings += [("ours", f"TeaCache {t:g}", lambda t=t: ours("teacache", t)) for t in args.teacache]
    settings += [("ours", f"FBCache {t:g}", lambda t=t: ours("fbcache", t)) for t in args.fbcache]
    for spec in args.ours:  # a preset or kind with options, "@X" for a threshold: "fbcache,extrapolate@0.18"
        name, _, value = spec.partition("@")
        settings.append(("ours", spec, lambda n=name, v=value: ours(n, float(v) if v else None)))
    settings += [("diffusers", "uncached", lambda: theirs(None))]
    settings += [
        ("diffusers", f"FirstBlockCache {t:g}", lambda t=t: theirs(FirstBlockCacheConfig(threshold=t)))
        for t in args.diffusers_fbc
    ]
    settings += [
        (
            "diffusers",
            f"MagCache {t:g}",
            lambda t=t: theirs(MagCacheConfig(threshold=t, mag_ratios=ratios, num_inference_steps=steps)),
        )
        for t in args.magcache
    ]
    faster = FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 681),
        current_timestep_callback=lambda: wrapper.timestep,
        attention_weight_callback=lambda _: 0.3,
        unconditional_batch_skip_range=5,
        unconditional_batch_timestep_skip_range=(-1, 781),
        tensor_format="BCFHW",
    )
    settings += [("diffusers", "FasterCache (docs example)", lambda: theirs(faster))]
    settings = [s for s in settings if args.impl in ("all", s[0])]

    print(
        f"embedded model, {steps} steps, guidance {components.defaults['guidance']}, {len(prompts)} "
        f"prompts x {args.seeds} seeds (SEED {args.seed}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(HEADER)
    rows = {}
    for impl, label, make in settings:
        if args.only and f"{impl}/{label}" not in args.only:
            continue
        counter = ours_count if impl == "ours" else theirs_count
        before = counter[0]
        videos, seconds, trajectories = run_setting(components, make(), prompts, args)
        row = {"videos": videos, "seconds": seconds, "forwards": (counter[0] - before) / trajectories}
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            np.savez(f"{args.save}/{impl}--{label}.npz", **row, prompts=np.array(prompts * args.seeds))
        rows[impl, label] = row
    print_rows(rows, prompts * args.seeds)


def print_rows(rows: dict, prompts: list[str]) -> None:
    """The table: each row against the uncached row of the same implementation."""
    for (impl, label), row in rows.items():
        videos, seconds, forwards = row["videos"], float(row["seconds"]), float(row["forwards"])
        ref = rows.get((impl, "uncached"))
        if ref is None:
            print(f"{impl:<9} {label:<32} (no uncached row of {impl} to compare with)")
            continue
        values = [psnr(a, b) for a, b in zip(videos, ref["videos"])]
        finite = [v for v in values if np.isfinite(v)]
        mean_db = statistics.mean(finite) if finite else float("inf")
        r = score(prompts, videos)
        o, h = r["overall"], r["heldout"]
        print(
            f"{impl:<9} {label:<32} {forwards:8.1f} {seconds:7.3f} {float(ref['seconds']) / seconds:7.2f}× "
            f"{mean_db:8.2f} {len(values) - len(finite):5d} {min(values):7.2f} "
            f"{sum(v < 28 for v in values):5d} | "
            f"{100 * o['color']:5.1f}% {100 * o['shape']:5.1f}% "
            f"{100 * o['direction']:5.1f}% {100 * o['all']:5.1f}% | "
            + "/".join(f"{100 * h[k]:.1f}" for k in ("color", "shape", "direction") if k in h),
            flush=True,
        )


def report(args: argparse.Namespace) -> None:
    """The table from the rows that ``quality --save DIR`` runs (possibly several processes) saved."""

    rows, prompts = {}, None
    files = sorted(
        Path(args.save).glob("*.npz"),
        key=lambda f: (f.stem.split("--")[0] != "ours", "uncached" not in f.stem, f.stem),
    )
    for f in files:
        data = np.load(f)
        impl, label = f.stem.split("--", 1)
        rows[impl, label] = dict(data)
        prompts = [str(p) for p in data["prompts"]]
    print(HEADER)
    print_rows(rows, prompts)


HEADER = (
    f"{'impl':<9} {'setting':<32} {'forwards':>8} {'DiT s':>7} {'speed-up':>8} {'PSNR dB':>8} {'same':>5} "
    f"{'min dB':>7} {'<28dB':>5} | {'color':>6} {'shape':>6} {'dir':>6} {'all':>6} | held-out c/s/d"
)


def cfg_sharing(args: argparse.Namespace) -> None:
    """Batched CFG with one shared decision vs separate cond/uncond forwards with one cache each."""
    from mochi.models.prompts import encode_prompts
    from mochi.models.vae_tiling import decode
    from mochi.sampling.sampler import initial_noise, sample
    from mochi.train.evaluate import latent_statistics
    from mochi.train.train_vae import from_pixels

    c = load_embedded()
    steps = args.steps or c.defaults["steps"]
    sigmas = linear_quadratic_schedule(steps)
    coefficients = load_coefficients(coefficients_path(c.source), c.dit.config)
    prompts = (shapes.eval_prompts() + shapes.heldout_prompts())[: args.limit or None]
    text = encode_prompts(prompts, c.tokenizer, c.text_encoder)
    null = encode_prompts([""], c.tokenizer, c.text_encoder)
    z = torch.cat([initial_noise((1, 12, 5, 8, 8), args.seed + i) for i in range(len(prompts))])
    mean, std = latent_statistics(c)
    count = last_block_counter(c.dit.blocks[-1], c.dit.blocks[-1].mlp_x)

    def run(model, batch_cfg: bool):  # noqa: ANN001, ANN202
        before = count[0]
        with torch.no_grad():
            out = sample(model, z, sigmas, text, null, guidance=c.defaults["guidance"], batch_cfg=batch_cfg)
            return from_pixels(decode(c.decoder, out * std + mean)), count[0] - before

    print(f"{len(prompts)} prompts, seeds {args.seed}+i, {steps} steps; passes = forwards of the blocks")
    print(f"{'setting':<16} {'CFG':<24} {'passes':>6} {'rows x passes':>13} {'PSNR dB':>8}")
    for batch_cfg in (True, False):
        ref, _ = run(c.dit, batch_cfg)
        for kind, threshold in ((k, float(t)) for k, t in (s.split(":") for s in args.cfg_settings)):
            cache = StepCache(c.dit, CacheSetting(kind, threshold), coefficients=coefficients, sigmas=sigmas)
            videos, passes = run(cache, batch_cfg)
            db = statistics.mean(psnr(a, b) for a, b in zip(videos, ref))
            mode = "batched, one decision" if batch_cfg else "separate, one cache each"
            rows = 2 * len(prompts) if batch_cfg else len(prompts)
            setting = f"{kind}:{threshold:g}"
            print(f"{setting:<16} {mode:<24} {passes:6d} {rows * passes:13d} {db:8.2f}", flush=True)


def compile_speed(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from mochi.accel.compile import compile_dit
    from mochi.models.dit import DIT_PRESETS, AsymmDiT

    sizes = {
        "small": (DIT_PRESETS["small"], (7, 30, 30)),
        "full-width-2": (DIT_PRESETS["full-width-2"], (3, 24, 24)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); best of {args.repeats} forwards")
    print(
        f"{'size':<13} {'dtype':<5} {'eager s':>8} {'compiled s':>10} {'speed-up':>8} {'compile s':>9} "
        f"{'max |diff|':>10}"
    )
    for name, (cfg, (t, h, w)) in sizes.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            dit = AsymmDiT(replace(cfg)).eval().to(dtype)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(2, cfg.in_channels, t, h, w, generator=g)
            text = torch.randn(2, 256, cfg.t5_feat_dim, generator=g)
            mask = torch.zeros(2, 256, dtype=torch.bool)
            mask[0, :77] = True
            sigma = torch.full((2,), 0.5)

            def forward(dit=dit, inputs=(x, sigma, text, mask)):  # noqa: ANN001, ANN202
                t0 = time.perf_counter()
                out = dit(*inputs)
                return out, time.perf_counter() - t0

            with torch.inference_mode():
                forward()
                eager_out, _ = forward()
                eager = min(forward()[1] for _ in range(args.repeats))
                if not compile_dit(dit):
                    print(f"{name:<13} {str(dtype)[6:]:<5} no compiler")
                    continue
                _, first = forward()
                compiled_out, _ = forward()
                compiled = min(forward()[1] for _ in range(args.repeats))
            diff = (compiled_out.float() - eager_out.float()).abs().max().item()
            print(
                f"{name:<13} {str(dtype)[6:]:<5} {eager:8.3f} {compiled:10.3f} {eager / compiled:7.2f}× "
                f"{first - compiled:9.1f} {diff:10.2e}",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("quality", "compile", "report", "cfg"))
    p.add_argument("--cfg-settings", type=lambda v: v.split(","), default=["teacache:0.08", "fbcache:0.15"])
    p.add_argument(
        "--only",
        type=lambda v: [x for x in v.split(";") if x],
        default=[],
        help="rows to run: impl/label;...",
    )
    p.add_argument("--save", metavar="DIR", help="quality: save each row's videos; report: read them")
    p.add_argument("--seeds", type=int, default=4, help="seeds pooled per prompt (≥ 4 for the issue)")
    p.add_argument("--seed", type=int, default=100, help="first seed (the calibration used 0-7)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (e.g. 24: eval_prompts)")
    p.add_argument(
        "--impl", choices=("all", "ours", "diffusers"), default="all", help="run one side only (same rows)"
    )
    p.add_argument("--repeats", type=int, default=3, help="compile: timed forwards per case (best kept)")
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--teacache", type=floats, default=[0.05, 0.1, 0.2])
    p.add_argument("--fbcache", type=floats, default=[0.1, 0.2])
    p.add_argument(
        "--ours",
        type=lambda v: [x for x in v.split(";") if x],
        default=["teacache:2x", "fbcache:3x"],
        help="more of our settings, ';'-separated: a preset or kind with options, '@X' for a threshold",
    )
    p.add_argument("--diffusers-fbc", type=floats, default=[0.1, 0.2])
    p.add_argument("--magcache", type=floats, default=[0.06, 0.12])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="In CPU autocast")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    {"quality": quality, "compile": compile_speed, "report": report, "cfg": cfg_sharing}[args.part](args)


if __name__ == "__main__":
    main()

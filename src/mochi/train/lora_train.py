"""LoRA fine-tuning of the DiT with the rectified-flow loss, resumable at any moment (genmo-mochi.md §6.3).

Per sample: z = vae_to_dit(mean + exp(logvar/2)·n) (a draw from the cached VAE posterior, mapped to the
DiT's normalised space; ``latents="mean"`` takes the posterior mean instead, for a base model trained on
means such as the embedded one), ε ~ N(0, I), σ uniform on [0, 1) or shifted towards noise; the DiT sees
z_σ = (1−σ)·z + σ·ε and is trained to predict v = z − ε, all in the *same* normalised space that sampling
uses. Genmo's fine-tuner builds z_σ from raw VAE latents and normalises only the target (§6.3): its inputs
then differ from what the model meets at inference, and subtracting the latent mean from a velocity has
no meaning. docs/lora.md explains the choice.

Caption dropout replaces a caption by the empty prompt (zero tokens, as at inference). AdamW with linear
warmup then cosine decay to zero. bf16 autocast on CUDA only; fp32 on CPU. Gradient checkpointing wraps
every DiT block from outside (``checkpoint_blocks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mochi.finite import NonFiniteError, all_finite, check_finite
from mochi.models.latents import vae_to_dit
from mochi.models.lora import (
    BLOCK_LINEARS,
    DEFAULT_TARGETS,
    add_trainable_lora,
    check_targets,
    target_modules,
    trainable_lora_state_dict,
)
from mochi.request import MAX_STEPS as MAX_SAMPLE_STEPS
from mochi.request import SPATIAL_MULTIPLE, check_prompt, check_seed
from mochi.train.data import LatentDataset, model_fingerprint
from mochi.train.lora_state import ResumeError, clear_states, load_latest_state, save_state
from mochi.train.lr import warmup_cosine

SIGMA_SAMPLING = ("uniform", "shifted")
# Sanity bounds: AdamW moves each weight by about lr per step, so lr > 1 cannot train; alpha/rank scales
# the LoRA's output, and beyond 64 the first steps already overflow.
MAX_LR, MAX_SCALING = 1.0, 64
# Bounds on counts, far beyond any real run, so that a typo is refused rather than hanging (a batch of 10**20
# clips was being listed) or writing gigabytes (rank 100000): clips per optimizer step, steps.
MAX_CLIPS_PER_STEP, MAX_STEPS = 4096, 10**7
LATENTS = ("sample", "mean")
# Settings a resumed run may change; any other difference means another run and is refused.
# gradient_checkpointing changes memory only (the same LoRA bytes, tested): a run out of memory turns it on.
RESUMABLE_CHANGES = (
    "steps",
    "checkpoint_every",
    "sample_every",
    "sample_prompts",
    "sample_steps",
    "keep",
    "gradient_checkpointing",
)
# Bounds of --sigma-shift: beyond them every sigma is within a float's rounding of 0 or 1 (a shift of 1e39
# made NaN sigmas, found after the model loaded).
MAX_SIGMA_SHIFT = 1000.0


@dataclass(frozen=True)
class LoraTrainConfig:
    """Hyper-parameters of a run; defaults are Genmo's lora.yaml (§6.3), its 200 warmup steps included."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    lr: float = 2e-4
    weight_decay: float = 0.01
    steps: int = 2000
    warmup: int = 200
    batch_size: int = 1
    grad_accum: int = 1
    sigma_sampling: str = "uniform"
    sigma_shift: float = 3.0  # "shifted": σ' = sσ/(1+(s−1)σ), more steps at high noise (SD3's shift)
    caption_dropout: float = 0.1
    # "sample" (Genmo) or "mean": posterior samples or means. None: what the base model was trained on, as
    # its defaults say ("latents"; the embedded model: "mean"), else "sample".
    latents: str | None = None
    checkpoint_every: int = 200
    sample_every: int = 200  # 0 disables samples
    sample_prompts: tuple[str, ...] = ()  # default: the first two captions of the data
    sample_steps: int | None = None  # default: the model's
    gradient_checkpointing: bool = False
    seed: int = 0
    keep: int = 2  # state files kept

    def __post_init__(self) -> None:
        # One order for one set of targets (they train the same LoRA in any order; a reordered --targets
        # refused a resume), each once. Unknown names stay, for validate to name.
        object.__setattr__(self, "targets", canonical_targets(self.targets))

    def validate(self) -> None:
        check_targets(self.targets)
        for name in ("rank", "steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps={self.steps} is more than {MAX_STEPS:,}; Genmo's recipe runs 2000")
        if self.batch_size * self.grad_accum > MAX_CLIPS_PER_STEP:
            raise ValueError(
                f"batch_size={self.batch_size} x grad_accum={self.grad_accum} clips per step is more than "
                f"{MAX_CLIPS_PER_STEP}; Genmo's recipe trains on 1"
            )
        for name in ("warmup", "checkpoint_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"lr={self.lr} must be in (0, {MAX_LR:g}]; Genmo uses 2e-4")
        if not 0 < self.alpha <= MAX_SCALING * self.rank:
            raise ValueError(
                f"alpha={self.alpha} must be in (0, {MAX_SCALING}·rank] = (0, {MAX_SCALING * self.rank:g}] "
                f"(the LoRA is scaled by alpha/rank); Genmo uses alpha = rank = 16"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay} must be a finite number ≥ 0; Genmo uses 0.01")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise ValueError(f"sample_steps={self.sample_steps} must be at least 1 (or unset: the model's)")
        if self.sample_steps is not None and self.sample_steps > MAX_SAMPLE_STEPS:
            # generate's limit: it was found at the first sample, named "steps" (train-lora's --steps), and
            # the steps trained since the last checkpoint were lost
            raise ValueError(
                f"sample_steps={self.sample_steps} is more than {MAX_SAMPLE_STEPS:,}, the most a video is "
                f"sampled with (Mochi uses 64); nearest valid: {MAX_SAMPLE_STEPS}"
            )
        if self.sample_every == 0 and (self.sample_prompts or self.sample_steps is not None):
            given = "sample_prompts" if self.sample_prompts else "sample_steps"
            raise ValueError(
                f"{given} applies only to samples, and sample_every=0 renders none; drop one of them"
            )
        for prompt in self.sample_prompts:
            check_prompt(prompt, "sample prompt")
        if self.sigma_sampling not in SIGMA_SAMPLING:
            raise ValueError(f"sigma_sampling={self.sigma_sampling!r} must be one of {list(SIGMA_SAMPLING)}")
        if not 1 / MAX_SIGMA_SHIFT <= self.sigma_shift <= MAX_SIGMA_SHIFT:
            nearest = MAX_SIGMA_SHIFT if self.sigma_shift > 1 else 1 / MAX_SIGMA_SHIFT
            raise ValueError(
                f"sigma_shift={self.sigma_shift} must lie in [{1 / MAX_SIGMA_SHIFT:g}, {MAX_SIGMA_SHIFT:g}] "
                f"(1 = uniform; Genmo's shifted sampling uses 3); nearest valid: {nearest:g}"
            )
        if self.latents is not None and self.latents not in LATENTS:
            raise ValueError(f"latents={self.latents!r} must be one of {list(LATENTS)}")
        check_seed(self.seed)  # as a generation's seed
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1]; Genmo uses 0.1")

    def as_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier of step ``step`` (0-based): linear warmup to 1, then cosine down to 0 at ``total``."""
    return warmup_cosine(step, warmup, total)


def sample_sigmas(n: int, mode: str, shift: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) noise levels in [0, 1): uniform, or uniform then shifted towards 1 by ``shift``."""
    u = torch.rand(n, generator=generator)
    if mode == "uniform":
        return u
    shifted = shift * u.double() / (1 + (shift - 1) * u.double())  # float64: no overflow for a large shift
    return shifted.clamp(max=1 - 2**-24).float()  # σ stays below 1, as uniform's


def stream_seed(seed: int, *keys: int) -> int:
    """A seed for one random stream of a run (which stream: ``keys``), below 2**63. A keyed hash rather than
    Python's ``hash``, which folds integers modulo 2**61 − 1 (seeds 0 and 2**61 − 1 drew the same batches)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def _generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, *keys))


def micro_batches(step: int, n: int, cfg: LoraTrainConfig) -> list[list[int]]:
    """Dataset indices of each micro-batch of ``step``: a fresh permutation of the data every epoch, drawn
    from (seed, epoch), so the order at any step is known without replaying the run."""
    per_step = cfg.batch_size * cfg.grad_accum
    positions = range(step * per_step, (step + 1) * per_step)
    perms: dict[int, list[int]] = {}
    picked = []
    for p in positions:
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=_generator(cfg.seed, 1, epoch)).tolist()
        picked.append(perms[epoch][p % n])
    return [picked[i : i + cfg.batch_size] for i in range(0, per_step, cfg.batch_size)]


def checkpoint_blocks(dit: nn.Module) -> None:
    """Gradient checkpointing from outside the model: each block's forward is recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    for block in dit.blocks:
        inner = block.forward
        block.forward = lambda *args, _f=inner: checkpoint(_f, *args, use_reentrant=False)


def flow_matching_loss(
    dit: nn.Module, batch: list, stats: tuple | None, cfg: LoraTrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mean-squared velocity error of one micro-batch of ``Example``s, everything in DiT space (fp32)."""
    device = next(dit.parameters()).device
    mean = torch.stack([e.mean for e in batch])
    logvar = torch.stack([e.logvar for e in batch])
    b = mean.shape[0]
    noise = torch.randn(mean.shape, generator=generator)  # drawn either way: one random stream for both
    z = vae_to_dit(mean if cfg.latents == "mean" else mean + torch.exp(0.5 * logvar) * noise, stats)
    eps = torch.randn(z.shape, generator=generator)
    sigma = sample_sigmas(b, cfg.sigma_sampling, cfg.sigma_shift, generator)
    drop = torch.rand(b, generator=generator) < cfg.caption_dropout
    s = sigma.view(-1, 1, 1, 1, 1)
    z_sigma, target = (1 - s) * z + s * eps, z - eps

    width = batch[0].text.shape[1]
    lengths = [0 if d else e.text.shape[0] for e, d in zip(batch, drop.tolist())]
    text = torch.zeros(b, max(max(lengths), 1), width)
    mask = torch.zeros(b, text.shape[1], dtype=torch.bool)
    for i, (e, n) in enumerate(zip(batch, lengths)):
        text[i, :n], mask[i, :n] = e.text[:n], True

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = dit(z_sigma.to(device), sigma.to(device), text.to(device), mask.to(device))
    return F.mse_loss(pred.float(), target.to(device))


class _StopRequest:
    """Turns the first Ctrl-C/SIGTERM into a flag checked between steps (a second one of either interrupts
    at once: the handlers before are back). ``signum``: the signal that asked."""

    def __enter__(self) -> _StopRequest:
        self.requested, self.signum, self._old = False, None, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                # Ignored by whoever started the process (nohup, `cmd &` in a script): it stays ignored.
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested, self.signum = True, signum
        for sig, old in self._old.items():  # both: a Ctrl-C after a SIGTERM only set the flag again
            signal.signal(sig, old)

    def stopped(self, message: str) -> KeyboardInterrupt:
        """What to raise once stopped: ``Terminated`` for SIGTERM (the CLI exits 143), else
        KeyboardInterrupt (130), as when either arrives outside training."""
        from mochi.errors import Terminated

        return (Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt)(message)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def canonical_targets(targets) -> tuple[str, ...]:  # noqa: ANN001 - any iterable of names
    """``targets`` without repeats, in the blocks' order (``BLOCK_LINEARS``), unknown names last."""
    given = list(dict.fromkeys(targets))
    return tuple([t for t in BLOCK_LINEARS if t in given] + [t for t in given if t not in BLOCK_LINEARS])


def _check_resumable(saved: dict, cfg: LoraTrainConfig, out: Path) -> None:
    now = cfg.as_json()
    if isinstance(saved.get("targets"), list):  # a run saved before targets had one order
        saved = {**saved, "targets": list(canonical_targets(saved["targets"]))}
    uniform = saved.get("sigma_sampling") == now.get("sigma_sampling") == "uniform"
    for key in sorted(set(saved) | set(now)):
        if key == "sigma_shift" and uniform:  # uniform sampling never reads the shift
            continue
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise ValueError(
                f"{str(out)!r} holds a run with {key}={saved.get(key)!r}, not {now.get(key)!r}; "
                f"rerun with the same settings to resume it, choose another --out for a new run, or pass "
                "--restart to replace it"
            )


def _say(message: str, show: bool) -> None:
    if show:
        print(f"mochi: {message}", file=sys.stderr)


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the run: a second train-lora on the same folder resumed the first's states,
    overwrote its files and made it fail. The lock goes with the process (a killed run leaves none held)
    and its file is removed at the end. ValueError naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = out / ".lock"
    while True:
        f = open(path, "a+")  # noqa: SIM115 (closed below, or by the with statement once it is the lock)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(
                f"{str(out)!r} is in use by another train-lora (pid {holder}); wait for it to end, or give "
                "another --out"
            ) from None
        # The run that held it removes the file as it ends: a lock taken on the removed file (opened just
        # before) would be a second holder beside a run that opens the new one. Held only if still the file.
        if _is_at(f, path):
            break
        f.close()
    with f:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held: no other run can have taken it


def _is_at(f, path: Path) -> bool:  # noqa: ANN001
    """Whether the open file ``f`` is the file now at ``path`` (not one removed or replaced since)."""
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(f.fileno())
    return (at.st_dev, at.st_ino) == (own.st_dev, own.st_ino)


def _resume_decision(  # noqa: ANN202
    out: Path, cfg: LoraTrainConfig, data: LatentDataset, restart: bool, show: bool, model: str = ""
):
    """The state to resume from (None: step 0), every decision said on stderr when ``show``.

    Unreadable newer states are named and skipped; states of another run (other settings or other data)
    or none readable at all are refused unless ``restart``, which removes them.
    """
    if restart:
        removed = clear_states(out)
        if removed:
            _say(f"--restart: removed {len(removed)} file(s) of the earlier run in {out}", show)
        return None
    state = load_latest_state(out)  # ResumeError when states exist and none is readable
    if state is None:
        return None
    for name, why in state["unreadable"]:
        _say(f"warning: training state {name} is unreadable ({why}); ignoring it", show)
    _check_resumable(state["config"], cfg, out)
    saved = state.get("data") or ""
    if saved and saved != data.fingerprint:
        raise ResumeError(
            f"{str(out)!r} holds a run trained on other data ({saved}; the data folder now holds "
            f"{data.fingerprint}); rerun with that data to resume, or pass --restart to train from step 0"
        )
    if not saved:
        _say("warning: the saved state does not record its data, so a change in it cannot be seen", show)
    if model and state.get("model") and state["model"] != model:  # a LoRA half on one, half on another
        raise ResumeError(
            f"{str(out)!r} holds a run trained on model {state['model']}, and this model is {model} (another "
            "checkpoint, or the same in another dtype); resume with that model, or pass --restart"
        )
    if state["step"] > cfg.steps:  # the finished LoRA would be a later step's, and say steps=cfg.steps
        raise ResumeError(
            f"{str(out)!r} holds a run at step {state['step']}, past --steps {cfg.steps}; give --steps "
            f"{state['step']} or more to resume, use a lora-step-N.safetensors file of an earlier step, or "
            "pass --restart to train from step 0"
        )
    _say(f"resuming from {Path(state['path']).name} (step {state['step']} of {cfg.steps})", show)
    before = state["config"].get("steps")
    if before is not None and before != cfg.steps and state["step"] < cfg.steps:
        _say(
            f"--steps {cfg.steps} where the run was started with {before}: the learning rate's cosine now "
            f"ends at step {cfg.steps}, from step {state['step']} on",
            show,
        )
    return state


def train_lora(
    pipe,  # noqa: ANN001 - mochi.pipeline.MochiPipeline
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: LoraTrainConfig,
    progress: bool = True,
    parallel=None,  # noqa: ANN001 - mochi.parallel.train.TrainParallel under torchrun
    restart: bool = False,
) -> Path:
    """Train a LoRA on ``pipe``'s DiT from a ``prepare_data`` folder; returns ``out_dir/lora.safetensors``.

    Resumes from the newest readable state in ``out_dir`` when there is one (same settings and data
    required; see `_resume_decision`, which says what it decided on stderr); ``restart`` discards the
    states of an earlier run instead and trains from step 0. Writes
    checkpoints every ``checkpoint_every`` steps, samples every ``sample_every`` steps, and a checkpoint on
    Ctrl-C/SIGTERM after the current step before raising KeyboardInterrupt (`mochi.errors.Terminated`
    for SIGTERM). ``parallel`` (set up by
    ``mochi.parallel.train.parallelize_training``): all ranks train one batch together; gradients are
    combined over ranks before each optimizer step, and only its main rank writes files.
    """
    cfg.validate()
    c = pipe.components
    if cfg.latents is None:
        cfg = dataclasses.replace(cfg, latents=c.defaults.get("latents", "sample"))
        cfg.validate()
    data = LatentDataset(data_dir)
    if cfg.sample_every and not cfg.sample_prompts and not any(e.caption.strip() for e in data.examples):
        raise ValueError(  # the samples were silently never rendered
            f"samples every {cfg.sample_every} steps need a prompt, and no clip of {str(data_dir)!r} has a "
            "caption with text; pass --sample-prompt TEXT or --sample-every 0"
        )
    out = Path(out_dir)
    writes = parallel is None or parallel.is_main
    # The folders this call makes: a run refused before it writes a file (a rank wider than the layers,
    # clips of another model) takes them away again rather than leave an empty --out behind.
    made = [d for d in (out, *out.parents) if not d.exists()] if writes else []
    if writes:
        out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as held:
            refused = None
            if writes:
                try:
                    held.enter_context(_run_lock(out))
                except ValueError as e:
                    refused = str(e)
            if parallel is not None:  # the other ranks must not touch (nor --restart clear) a folder in use
                refused = parallel.main_verdict(refused)
            if refused is not None:
                raise ValueError(refused)
            return _train(pipe, cfg, data, out, writes, progress, parallel, restart)
    except BaseException:
        for d in made:  # deepest first; one that holds anything stays, and so do those above it
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _train(  # noqa: PLR0913 - train_lora's settings, checked
    pipe,  # noqa: ANN001
    cfg: LoraTrainConfig,
    data: LatentDataset,
    out: Path,
    writes: bool,
    progress: bool,
    parallel,  # noqa: ANN001
    restart: bool,
) -> Path:
    """``train_lora`` once its settings and data are read and the run folder is this process's."""
    from mochi.files import atomic_write_text
    from mochi.weights.lora import save_lora

    c = pipe.components
    dit = c.dit
    narrowest = min(min(m.in_features, m.out_features) for m in target_modules(dit, cfg.targets).values())
    if cfg.rank > narrowest:  # factors wider than the layers they adapt: nothing gained, much stored
        raise ValueError(
            f"rank={cfg.rank} is more than the {narrowest} features of the narrowest targeted layer; "
            f"choose at most {narrowest} (Genmo uses 16)"
        )
    # The base model's fingerprint (not under torchrun: its weights may be sharded over the ranks there).
    model = model_fingerprint(c) if c.encoder is not None and parallel is None else ""
    ours = model or data.model
    # A warning, not an error: the fingerprint also changes with the dtype the model was read in.
    if data.model is not None and ours != data.model:
        _say(
            f"warning: the clips were prepared with model {data.model}, and this run's model is {ours} "
            "(another checkpoint, or the same in another dtype): the LoRA learns from latents and text "
            "features this model did not make; run prepare-data again with this model",
            writes and progress,
        )
    # Clips whose text features or latents this DiT cannot take at all (another model family's T5 or VAE)
    # failed inside the first step, after config.json was written: refused here, before any file.
    first = data.examples[0]
    for what, have, want in (
        ("text features", first.text.shape[-1], dit.config.t5_feat_dim),
        ("latent channels", first.mean.shape[0], dit.config.in_channels),
    ):
        if have != want:
            raise ValueError(
                f"the clips' {what} are {have} wide and this model's DiT takes {want}: they were prepared "
                f"with another model{f' ({data.model})' if data.model else ''}; run prepare-data again "
                "with this model"
            )
    height, width = first.mean.shape[2:]
    if height % dit.config.patch_size or width % dit.config.patch_size:
        raise ValueError(
            f"the clips' latents are {height}x{width} (height x width), and this model's DiT takes multiples "
            f"of its patch size {dit.config.patch_size}; run prepare-data again (its --width and --height, "
            f"multiples of {SPATIAL_MULTIPLE}, give such latents)"
        )
    stats = None if c.latent_mean is None else (c.latent_mean, c.latent_std)
    # --restart: the earlier run's files are rank 0's to remove; the other ranks start at step 0 with it.
    state = (
        None
        if restart and not writes
        else _resume_decision(out, cfg, data, restart, writes and progress, model)
    )
    if writes:
        atomic_write_text(out / "config.json", json.dumps(cfg.as_json(), indent=2) + "\n")
    if cfg.warmup >= cfg.steps:
        _say(
            f"warning: --warmup {cfg.warmup} is not below --steps {cfg.steps}: the learning rate rises for "
            f"the whole run and ends at {lr_factor(cfg.steps - 1, cfg.warmup, cfg.steps):.0%} of --lr; "
            f"give a smaller --warmup (e.g. {max(cfg.steps // 10, 0)})",
            writes and progress,
        )

    dit.to(pipe.device)  # an offloading pipeline keeps it elsewhere between stages; training needs it here
    torch.manual_seed(cfg.seed)
    add_trainable_lora(dit, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout)
    if cfg.gradient_checkpointing:
        checkpoint_blocks(dit)
    params = [p for _, p in sorted((n, p) for n, p in dit.named_parameters() if p.requires_grad)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        check_finite(state["lora"], f"training state {state['path']!r}")
        with torch.no_grad():
            for name, t in state["lora"].items():
                dit.get_parameter(name).copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]

    def checkpoint(step: int) -> None:
        if not writes:
            return
        lora = trainable_lora_state_dict(dit)
        # The LoRA file first: a kill between the two resumes from the state before, which writes this
        # step's file again (the same bytes); the other order left a state whose file never came.
        save_lora(read_layers(lora), out / f"lora-step-{step:06d}.safetensors", extra={"step": step})
        save_state(out, step, lora, optimizer.state_dict(), cfg.as_json(), cfg.keep, data.fingerprint, model)

    def read_layers(lora: dict) -> dict:
        from mochi.models.lora import LoraLayer

        names = {k.rsplit(".", 1)[0] for k in lora}
        return {n: LoraLayer(lora[f"{n}.lora_A"], lora[f"{n}.lora_B"], cfg.alpha) for n in sorted(names)}

    # Default sample prompts: the first two distinct captions that say something (an empty caption would
    # sample the unconditional model).
    captions = (e.caption for e in data.examples if e.caption.strip())
    prompts = list(cfg.sample_prompts) or list(dict.fromkeys(captions))[:2]
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, disable=not (progress and writes)
    )
    avg = None
    with _StopRequest() as stop:
        if start and cfg.sample_every and start % cfg.sample_every == 0 and parallel is None:
            # Samples of the step resumed from that a stop or a kill cut short: rendered now, or never.
            _write_samples(pipe, prompts, cfg, data.settings, out / "samples", start, writes, stop, True)
        dit.to(pipe.device).train()
        for step in range(start, cfg.steps):
            gen = _generator(cfg.seed, 2, step)
            torch.manual_seed(stream_seed(cfg.seed, 3, step))  # LoRA dropout, if any
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.warmup, cfg.steps)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for indices in micro_batches(step, len(data), cfg):
                loss = flow_matching_loss(dit, [data[i] for i in indices], stats, cfg, gen)
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            if parallel is not None:
                parallel.sync_grads(params)
            if not (math.isfinite(total) and all(all_finite(p.grad) for p in params if p.grad is not None)):
                bar.close()
                raise NonFiniteError(_diverged(step + 1, total, out))  # before the step: weights stay good
            optimizer.step()
            done = step + 1
            avg = total if avg is None else 0.95 * avg + 0.05 * total
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            saved = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps
            if saved:
                checkpoint(done)
            if cfg.sample_every and done % cfg.sample_every == 0:
                _write_samples(pipe, prompts, cfg, data.settings, out / "samples", done, writes, stop)
                dit.to(pipe.device).train()
            requested = stop.requested if parallel is None else parallel.any_rank(stop.requested)
            if requested:  # checked last: a stop during sampling is honoured too
                if not saved:
                    checkpoint(done)
                bar.close()
                message = f"stopped after step {done} (checkpoint saved); rerun the same command to resume"
                if progress and writes:
                    tqdm.write(message, file=sys.stderr)
                raise stop.stopped(message)
    bar.close()
    final = out / "lora.safetensors"
    if writes:
        save_lora(read_layers(trainable_lora_state_dict(dit)), final, extra={"step": max(start, cfg.steps)})
    return final


def _diverged(step: int, loss: float, out: Path) -> str:
    from mochi.train.lora_state import list_states

    states = list_states(out)
    kept = (
        f"the last good checkpoint, {states[-1].name} (and its lora-step-*.safetensors), is kept"
        if states
        else "no checkpoint had been written yet"
    )
    return (
        f"training diverged: the loss at step {step} is {loss} (or its gradients are not finite); stopped "
        f"without saving it, {kept}. Lower --lr or --alpha and train into a new --out (or this one with "
        "--restart)"
    )


def _write_samples(  # noqa: PLR0913
    pipe,  # noqa: ANN001 - mochi.pipeline.MochiPipeline
    prompts: list[str],
    cfg: LoraTrainConfig,
    size: dict,
    folder: Path,
    step: int,
    writes: bool = True,
    stop=None,  # noqa: ANN001 - _StopRequest
    missing_only: bool = False,
) -> None:
    """Render the sample prompts with the LoRA as it is now (seed ``cfg.seed + i``, wrapped below 2**63);
    ``writes``: this process writes the videos (under torchrun every rank renders, rank 0 writes). A stop
    requested (``stop``) ends it between samples: the rest come when the run resumes at this step.
    ``missing_only``: render only the samples whose file is not there."""
    from mochi.request import GenerationRequest
    from mochi.video import write_video

    if writes:
        folder.mkdir(parents=True, exist_ok=True)
    pipe.components.dit.eval()
    for i, prompt in enumerate(prompts):
        path = folder / f"step-{step:06d}-{i}.mp4"
        if stop is not None and stop.requested:
            return
        if missing_only and path.exists():
            continue
        seed = (cfg.seed + i) % 2**63  # the largest --seed, plus one, was refused after the first sample
        req = GenerationRequest(prompt, seed=seed, steps=cfg.sample_steps, **size)
        result = pipe.generate(req)
        if writes:
            write_video(result.frames[0], path)

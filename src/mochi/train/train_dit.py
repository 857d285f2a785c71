"""Stage 2 of the tiny model: the T5 text encoder and the AsymmDiT, trained jointly from scratch.

First the trained VAE encoder turns ``cache_clips`` clips of dataset ``seed`` into a latent cache (mean and
log-variance, in chunks so that an interruption loses at most one chunk); the per-channel statistics of
the latents it learns (posterior means by default, see ``DiTRecipe.sample_posterior``) become the model's
``latent_mean``/``latent_std``, and the DiT works in the normalised space ``(z − mean)/std``, as the
released model does.

Rectified flow, Genmo's sign: x0 a normalised posterior mean (or sample), ε ~ N(0, I), z_σ = (1 − σ)·x0 + σ·ε,
and the DiT regresses v = x0 − ε (MSE). σ is drawn from a mixture: with probability ``uniform_share`` uniform
on [0, 1], else logit-normal sigmoid(N(``logit_mean``, 1)) with a positive mean, which weights the high noise
levels where Genmo's schedule spends half of its steps and where layout and motion are decided. A
``caption_dropout`` share of captions become the empty prompt (zero text tokens, all-zero features, as
``encode_prompts`` gives for ""), so classifier-free guidance works. An EMA of both models is kept and
exported.

An optional second phase (``tune_steps``; off by default, the shipped model runs it as stage 2b of
docs/embedded-model.md) restarts the schedule, can leave caption words out (``word_dropout``) and can add
clips of every composition whose captions still obey the held-out rule (``tune_clips``). Two more options
hold the DiT's pooled caption vector at zero (``pooled_caption``; an experiment) and make the T5 encode each
word independently of its neighbours (``word_consistency``; stage 2b uses it).

Step ``s`` draws its clips, posterior noise, σ, ε and dropout from a generator seeded with (seed, s), so
resuming at step s replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mochi.models.dit import AsymmDiT, DiTConfig
from mochi.models.t5 import T5Encoder
from mochi.models.tokenizer import ByteTokenizer, tokenize_prompts
from mochi.presets import ModelPreset
from mochi.train import shapes
from mochi.train.checkpoint import (
    check_preset,
    check_resumable,
    ema_update,
    load_checkpoint,
    load_parts,
    preset_configs,
    save_checkpoint,
)
from mochi.train.train_vae import VAE_CHECKPOINT, contrast_weight, foreground_weights, lr_at, to_pixels
from mochi.weights.io import read_metadata, read_state_dict, save_state_dict

DIT_CHECKPOINT = "dit.ckpt"
DIT_PARTS = ("text_encoder", "dit")  # the preset's parts a DiT checkpoint holds (and records the configs of)
CACHE_DIR = "latents"
TUNE_CACHE_DIR = "latents-tune"


@dataclass(frozen=True)
class CacheSpec:
    """Which clips a latent cache holds: clips ``0 … clips − 1`` of dataset ``seed``."""

    folder: str
    clips: int
    seed: int
    allow_heldout: bool = False


def cache_specs(recipe: DiTRecipe) -> tuple[CacheSpec, ...]:
    """The caches a recipe trains on: the first phase's, then the tuning phase's extra clips if any."""
    main = CacheSpec(CACHE_DIR, recipe.cache_clips, recipe.seed)
    if recipe.tune_steps and recipe.tune_clips:
        return main, CacheSpec(TUNE_CACHE_DIR, recipe.tune_clips, recipe.seed + 1, allow_heldout=True)
    return (main,)


@dataclass(frozen=True)
class DiTRecipe:
    steps: int = 24000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    uniform_share: float = 0.2
    logit_mean: float = 0.5
    ema_decay: float = 0.999
    # Then ``tune_steps`` more steps with a fresh cosine schedule from ``tune_lr``, in which each of a
    # caption's colour, shape and direction words is left out with probability ``word_dropout`` (see
    # ``drop_words``): every word must then carry its attribute whatever the words around it are, which
    # is what a held-out composition asks of the model.
    tune_steps: int = 0
    tune_lr: float = 2e-4
    word_dropout: float = 0.0
    # The tuning phase also draws from ``tune_clips`` more clips (dataset ``seed + 1``) of *every*
    # composition, held-out ones included. Their captions obey the held-out rule all the same: a caption
    # that would hold every word of a held-out line loses one of those words (``allowed_caption``), so the
    # model sees, say, a green triangle only as "a green moving left" or "a triangle moving left", and
    # never reads "green" and "triangle" together.
    tune_clips: int = 0
    # Train on the posterior means (False) or on posterior samples (True, as Genmo's trainer does). The
    # tiny VAE's posterior noise is as large as the distance between some colours' latents (yellow and
    # orange), so a DiT trained on samples learns latents the decoder can only decode as a blend of the
    # two; on means it learns the encoder's deterministic codes, which the tuned decoder decodes exactly.
    sample_posterior: bool = False
    # Whether the DiT's attention-pooled caption vector (``t5_y_embedder``, added to the timestep embedding
    # that modulates every block) is trained. When False its weights are zeroed when training starts or
    # resumes and never updated, so the model reads the caption only through joint attention over its
    # tokens: a tiny model otherwise learns each whole caption as one class through that vector, and a
    # held-out composition then gets the vector of its nearest trained caption (docs/embedded-model.md).
    pooled_caption: bool = True
    # Weight of a loss that makes the T5 encode each word the same whatever the words around it are: each
    # full caption of the batch gets a partner caption with some of its colour, shape and direction redrawn
    # (an allowed caption), and the features of every word the two share are pulled together (squared
    # difference relative to their squared norms; ``word_consistency_loss``). A held-out composition's words
    # then reach the DiT as they do in trained captions. 0 = off.
    word_consistency: float = 0.0
    # Weigh the flow loss 1 + ``object_weight`` times at the latent positions whose pixels hold the object
    # (``latent_object_mask``; weighted mean, so 0 gives the plain MSE bit for bit). The object covers 3-16%
    # of a frame, so the plain loss spends most of the model on the background; the VAE's object weighting
    # (``VAERecipe.early_foreground_weight``) is the same idea in pixels. 0 = off (the v2 recipe).
    object_weight: float = 0.0
    # Weigh each clip's flow loss by contrast^-p (``train_vae.contrast_weight``: the RGB distance between
    # its object's colour and its background, normalised to mean 1 over the palette; 0 = off). Generation
    # misses shape mostly on the gray background and there mostly for the faintest colours (green, purple,
    # blue: docs/embedded-model.md, v5), whose latents differ least from the background's.
    contrast_power: float = 0.0
    # A finishing phase after the tuning phase (0 steps = off): ``finish_steps`` more steps with a fresh
    # cosine from ``finish_lr``, drawing and captioning as the tuning phase does, with σ from the same
    # mixture but a logit-normal centred at ``finish_logit_mean`` (sigmoid(−1) ≈ 0.27) instead of
    # ``logit_mean``. The first phases spend about 6% of their samples below σ = 0.2, where the DiT draws
    # corners and points, and generation loses most of its shape there: a true clip's code noised to σ = 0.2
    # and denoised by the DiT judges 86.5% where the code itself judges 94.2% (docs/embedded-model.md, v5).
    # A run can start this phase from an exported bundle (``init_from_bundle``).
    finish_steps: int = 0
    finish_lr: float = 1e-4
    finish_logit_mean: float = -1.0
    text_length: int = 64  # byte tokens per caption: the longest caption is 52 with its end token
    cache_clips: int = 4000
    cache_chunk: int = 500
    frames: int = 25
    height: int = 64
    width: int = 64
    seed: int = 2
    log_every: int = 50
    checkpoint_every: int = 200


def latent_object_mask(pixels: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, 1, t, h, w) float mask, 1 where a latent element's pixels hold any of the object (or its rim):
    ``pixels`` (B, 3, T, H, W) in [−1, 1] with T = 1 + k·(t − 1) frames as the causal VAE compresses them
    (latent frame 0 is pixel frame 0, latent frame i ≥ 1 pixel frames k(i − 1) + 1 … k·i) and H/h × W/w
    pixel blocks."""
    t, h, w = latent_shape
    b, _, frames, height, width = pixels.shape
    if t < 1 or h < 1 or w < 1 or (frames - 1) % max(t - 1, 1) or height % h or width % w:
        raise ValueError(f"pixels of {tuple(pixels.shape)} do not compress to a latent of {t}×{h}×{w}")
    obj = foreground_weights(pixels, 1.0) - 1.0  # (B, 1, T, H, W), 1 on the object
    first = obj[:, :, :1]
    if t > 1:
        k = (frames - 1) // (t - 1)
        rest = obj[:, :, 1:].reshape(b, 1, t - 1, k, height, width).amax(dim=3)
        obj = torch.cat([first, rest], dim=2)
    else:
        obj = first
    return obj.reshape(b, 1, t, h, height // h, w, width // w).amax(dim=(4, 6))


def _chunk_path(out: Path, k: int, folder: str = CACHE_DIR) -> Path:
    return out / folder / f"chunk-{k:04d}.safetensors"


@torch.no_grad()
def build_latent_cache(
    out: Path, preset: ModelPreset, recipe: DiTRecipe, log=print, spec: CacheSpec | None = None
) -> None:
    """Encode the clips of ``spec`` (default: clips ``0 … cache_clips − 1`` of dataset ``recipe.seed``)
    with the trained VAE encoder."""
    spec = spec or cache_specs(recipe)[0]
    from mochi.models.vae import Encoder

    state = load_checkpoint(out / VAE_CHECKPOINT)
    if state is None:
        raise ValueError(f"no VAE checkpoint in {str(out)!r}: run `python -m mochi.train.tiny vae` first")
    if state["step"] < state["encoder_steps"]:
        raise ValueError(
            f"the VAE checkpoint in {str(out)!r} is at step {state['step']}, but its encoder trains until "
            f"step {state['encoder_steps']}: let `python -m mochi.train.tiny vae` get there first"
        )
    encoder = Encoder(preset.encoder)
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    (out / spec.folder).mkdir(exist_ok=True)
    n_chunks = math.ceil(spec.clips / recipe.cache_chunk)
    for k in range(n_chunks):
        path = _chunk_path(out, k, spec.folder)
        if path.exists():
            written = read_metadata(path).get("dataset_seed")  # absent in chunks written before it was kept
            if written is not None and int(written) != spec.seed:
                raise ValueError(
                    f"the latent cache chunk {str(path)!r} holds clips of dataset seed {written}, but this "
                    f"run asks for seed {spec.seed}: train another seed in another run folder (copy its "
                    f"vae.ckpt there), or delete {str(out / spec.folder)!r} to rebuild the cache"
                )
            continue
        t0 = time.time()
        lo, hi = k * recipe.cache_chunk, min((k + 1) * recipe.cache_chunk, spec.clips)
        captions, means, logvars, objects = [], [], [], []
        for start in range(lo, hi, 16):
            n = min(16, hi - start)
            size = (recipe.frames, recipe.height, recipe.width)
            clips = list(shapes.clips(spec.seed, n, *size, start=start, allow_heldout=spec.allow_heldout))
            captions += [c for c, _ in clips]
            pixels = to_pixels(np.stack([v for _, v in clips]))
            mean, logvar = encoder(pixels)
            means.append(mean)
            logvars.append(logvar.clamp(-30.0, 20.0))
            objects.append(latent_object_mask(pixels, tuple(mean.shape[2:])).to(torch.uint8))
        tensors = {"mean": torch.cat(means), "logvar": torch.cat(logvars), "object": torch.cat(objects)}
        metadata = {
            "captions": json.dumps(captions),
            "vae_step": str(state["step"]),
            "dataset_seed": str(spec.seed),
        }
        save_state_dict(tensors, path, metadata)
        took = time.time() - t0
        log(f"latent cache {spec.folder}: chunk {k + 1}/{n_chunks} ({hi - lo} clips) in {took:.0f} s")


def load_latent_cache(
    out: Path, recipe: DiTRecipe, spec: CacheSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(mean, logvar) each (N, 12, t, h, w) and the N captions of a cache (default: the first phase's)."""
    mean, logvar, captions, _ = load_latent_cache_with_objects(out, recipe, spec)
    return mean, logvar, captions


def load_latent_cache_with_objects(
    out: Path, recipe: DiTRecipe, spec: CacheSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
    """``load_latent_cache`` plus the (N, 1, t, h, w) object masks (float), or None when a chunk was written
    before caches held them."""
    spec = spec or cache_specs(recipe)[0]
    means, logvars, captions, objects = [], [], [], []
    for k in range(math.ceil(spec.clips / recipe.cache_chunk)):
        path = _chunk_path(out, k, spec.folder)
        sd = read_state_dict(path)
        means.append(sd["mean"])
        logvars.append(sd["logvar"])
        objects.append(sd.get("object"))
        captions += json.loads(read_metadata(path)["captions"])
    masks = None if any(o is None for o in objects) else torch.cat(objects).float()
    return torch.cat(means), torch.cat(logvars), captions, masks


def latent_stats(
    mean: torch.Tensor, logvar: torch.Tensor, seed: int, sample: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (12,), in float64, of the latents the DiT learns: one posterior sample of
    every cached clip (``sample``) or the posterior means."""
    if sample:
        gen = torch.Generator().manual_seed(seed)
        mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
    z = mean.double()
    z = z.transpose(0, 1).flatten(1)
    return z.mean(1), z.std(1)


def build_text_and_dit(preset: ModelPreset, seed: int) -> tuple[T5Encoder, AsymmDiT]:
    torch.manual_seed(seed)
    text_encoder = T5Encoder(preset.text_encoder)
    text_encoder.initialize_weights(torch.Generator().manual_seed(seed))
    dit = AsymmDiT(preset.dit)
    # The output projection starts at zero: the first prediction is v = 0 and the loss starts at E|x0 − ε|².
    torch.nn.init.zeros_(dit.final_layer.linear.weight)
    torch.nn.init.zeros_(dit.final_layer.linear.bias)
    return text_encoder, dit


def text_features(
    text_encoder: T5Encoder, captions: list[str], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, length, d_model) with gradients and mask (B, length); "" gives zero tokens and zeros."""
    ids, mask = tokenize_prompts(captions, ByteTokenizer(), length)
    features = text_encoder(ids, mask) * mask[..., None]
    return features, mask


def hold_pooled_caption_at_zero(dit: AsymmDiT, ema: dict[str, torch.Tensor]) -> None:
    """Zero the caption pooling's weights (and their EMA) and stop their updates: c is then the timestep
    embedding alone (AdamW skips parameters without a gradient, weight decay included)."""
    with torch.no_grad():
        for name, p in dit.t5_y_embedder.named_parameters():
            p.zero_()
            p.requires_grad_(False)
            ema[f"dit.t5_y_embedder.{name}"].zero_()


def sample_sigmas(n: int, recipe: DiTRecipe, gen: torch.Generator) -> torch.Tensor:
    """(n,) noise levels in (0, 1): the uniform / shifted logit-normal mixture described above."""
    logit = torch.sigmoid(recipe.logit_mean + torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < recipe.uniform_share
    return torch.where(pick, uniform, logit).clamp(1e-4, 1 - 1e-4)


def drop_words(text: str, drop: tuple[bool, bool, bool]) -> str:
    """``text`` without its colour, shape and/or direction (``drop`` in that order), e.g. ``a red circle
    moving up`` with (False, True, False) → ``a red moving up``; without a direction ``moving`` goes too.
    The empty prompt stays empty."""
    if not text:
        return text
    fields = shapes.parse_caption(text)
    words = ["a"]
    words += [] if drop[0] else [str(fields["color"])]
    words += [] if drop[1] else [str(fields["shape"])]
    words += [] if drop[2] else ["moving", str(fields["direction"])]
    if fields["named_background"]:
        words += ["on", "a", str(fields["background"]), "background"]
    return " ".join(words)


def allowed_caption(text: str, drop: tuple[bool, bool, bool], pick: float) -> str:
    """``drop_words(text, drop)``, with one more of the words left out if that caption would still hold
    every word of a held-out line: the one at ``pick`` ∈ [0, 1) among those whose removal is enough (every
    line names a shape, so leaving the shape out always is)."""
    out = drop_words(text, drop)
    if not shapes.is_heldout(out):
        return out
    enough = [k for k in range(3) if not drop[k] and not shapes.is_heldout(drop_words(text, _with(drop, k)))]
    return drop_words(text, _with(drop, enough[int(pick * len(enough))]))


def partner_caption(text: str, gen: torch.Generator) -> tuple[str, list[tuple[int, int, int]]] | None:
    """A caption like ``text`` (a full caption of the grammar) with each of its colour, shape and direction
    redrawn with chance 1/2 (at least one word changes), never a held-out one, and the words the two share as
    (start in text, start in partner, length) in characters, which are byte tokens. None for the empty
    prompt or a caption with words left out."""
    try:
        fields = shapes.parse_caption(text)
    except ValueError:
        return None
    vocab = shapes.DEFAULT_VOCAB
    tables = (vocab.colors, vocab.shapes, vocab.directions)
    keys = ("color", "shape", "direction")
    for _ in range(100):
        redraw = (torch.rand(3, generator=gen) < 0.5).tolist()
        if not any(redraw):
            redraw[int(torch.randint(3, (1,), generator=gen))] = True
        picks = [int(torch.randint(len(t), (1,), generator=gen)) for t in tables]
        new = {k: (t[i] if r else fields[k]) for k, t, i, r in zip(keys, tables, picks, redraw)}
        spec = shapes.caption_words(
            new["color"],
            new["shape"],
            new["direction"],
            str(fields["background"]),
            bool(fields["named_background"]),
        )
        partner = " ".join(spec)
        if partner != text and not shapes.is_heldout(partner):
            break
    else:  # pragma: no cover - every draw held out cannot happen with the default vocabulary
        return None
    shared, i, j = [], 0, 0
    for a, b in zip(text.split(" "), spec):
        if a == b:
            shared.append((i, j, len(a)))
        i, j = i + len(a) + 1, j + len(b) + 1
    return partner, shared


def word_consistency_loss(
    features: torch.Tensor, partner_features: torch.Tensor, pairs: list[tuple[int, int, int, int]]
) -> torch.Tensor:
    """Mean over shared tokens of |f − g|² / (|f|² + |g|²): ``pairs`` holds (row, start, partner start,
    length) for every shared word; row indexes both (B, L, d) feature tensors."""
    rows = torch.tensor([r for r, _, _, n in pairs for _ in range(n)])
    here = torch.tensor([a + k for _, a, _, n in pairs for k in range(n)])
    there = torch.tensor([b + k for _, _, b, n in pairs for k in range(n)])
    f, g = features[rows, here], partner_features[rows, there]
    return ((f - g).square().sum(-1) / (f.square().sum(-1) + g.square().sum(-1)).clamp(min=1e-8)).mean()


def _check_heldout_rule(captions: list[str]) -> None:
    """The rule of issue 6, checked on every caption the models read."""
    held = [c for c in captions if shapes.is_heldout(c)]
    if held:
        raise AssertionError(f"training caption {held[0]!r} holds a held-out composition")


def _with(drop: tuple[bool, bool, bool], k: int) -> tuple[bool, bool, bool]:
    return tuple(d or i == k for i, d in enumerate(drop))  # type: ignore[return-value]


def train_dit(out: str | Path, preset: ModelPreset, recipe: DiTRecipe = DiTRecipe(), log=print) -> dict:
    """Build the latent cache if needed, then train (or resume) to ``steps + tune_steps`` into
    ``out/dit.ckpt``."""
    out = Path(out)
    specs = cache_specs(recipe)
    for spec in specs:
        build_latent_cache(out, preset, recipe, log, spec)
    cache_mean, cache_logvar, captions, cache_object = load_latent_cache_with_objects(out, recipe)
    # The latent statistics are the first phase's: the tuning phase's clips must not move the latent space.
    stats = latent_stats(cache_mean, cache_logvar, recipe.seed, recipe.sample_posterior)
    n_cache = cache_mean.shape[0]
    for spec in specs[1:]:
        extra = load_latent_cache_with_objects(out, recipe, spec)
        cache_mean, cache_logvar = torch.cat([cache_mean, extra[0]]), torch.cat([cache_logvar, extra[1]])
        captions = captions + extra[2]
        cache_object = (
            None if cache_object is None or extra[3] is None else torch.cat([cache_object, extra[3]])
        )
    clip_weights = None
    if recipe.contrast_power:
        fields = [shapes.parse_caption(c) for c in captions]
        clip_weights = torch.tensor(
            [contrast_weight(f["color"], f["background"], recipe.contrast_power) for f in fields]
        )
    if recipe.object_weight and cache_object is None:
        raise ValueError(
            f"the latent cache in {str(out)!r} holds no object masks (written before they existed), but "
            f"object_weight is {recipe.object_weight}: delete its latents folders to rebuild them, or train "
            "with object weight 0"
        )

    text_encoder, dit = build_text_and_dit(preset, recipe.seed)
    models = torch.nn.ModuleDict({"text_encoder": text_encoder, "dit": dit})
    params = list(models.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = {n: p.detach().clone() for n, p in models.named_parameters()}
    step, last = 0, float("nan")
    state = load_checkpoint(out / DIT_CHECKPOINT)
    if state is not None:
        check_resumable(state, out / DIT_CHECKPOINT, {"seed": (recipe.seed, "--seed {}")})
        check_preset(state, out / DIT_CHECKPOINT, preset)
        load_parts(out / DIT_CHECKPOINT, {"DiT": models}, {"DiT": state["model"]})
        ema = state["ema"]
        opt.load_state_dict(state["optimizer"])
        step, last = int(state["step"]), float(state["loss"])
        # The statistics the DiT was trained in (equal to the cache's, unless the run started from a bundle).
        stats = tuple(torch.tensor(state[k], dtype=torch.float64) for k in ("latent_mean", "latent_std"))
        log(f"dit: resumed at step {step} from {out / DIT_CHECKPOINT}")
    mu, sd = (s.float().view(1, -1, 1, 1, 1) for s in stats)
    if not recipe.pooled_caption:
        hold_pooled_caption_at_zero(dit, ema)

    def snapshot() -> dict:
        return {
            "model": models.state_dict(),
            "ema": ema,
            "optimizer": opt.state_dict(),
            "step": step,
            "seed": recipe.seed,
            "configs": preset_configs(preset, DIT_PARTS),
            "loss": last,
            "latent_mean": stats[0].tolist(),
            "latent_std": stats[1].tolist(),
        }

    total, total_consistency, t0 = 0.0, 0.0, time.time()
    tuned = recipe.steps + recipe.tune_steps
    end = tuned + recipe.finish_steps
    finish_sigmas = replace(recipe, logit_mean=recipe.finish_logit_mean)
    while step < end:
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        tuning = step >= recipe.steps  # the finishing phase too
        finishing = step >= tuned
        # The first phase draws from its own cache; the tuning phase from every cache.
        index = torch.randint(cache_mean.shape[0] if tuning else n_cache, (recipe.batch,), generator=gen)
        mean, logvar = cache_mean[index], cache_logvar[index]
        noise = torch.randn(mean.shape, generator=gen)  # drawn either way: the same stream for both
        z = mean + (0.5 * logvar).exp() * noise if recipe.sample_posterior else mean
        x0 = (z - mu) / sd
        eps = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(recipe.batch, finish_sigmas if finishing else recipe, gen)
        drop = torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        if tuning:  # drawn last, so the first phase's stream is unchanged
            words = (torch.rand(recipe.batch, 3, generator=gen) < recipe.word_dropout).tolist()
            picks = torch.rand(recipe.batch, generator=gen).tolist()
            batch_captions = [
                allowed_caption(c, tuple(w), p) for c, w, p in zip(batch_captions, words, picks)
            ]
        _check_heldout_rule(batch_captions)
        s = sigma.view(-1, 1, 1, 1, 1)
        z_sigma = (1 - s) * x0 + s * eps
        for group in opt.param_groups:
            group["lr"] = (
                lr_at(step - tuned, recipe.finish_steps, recipe.finish_lr, recipe.warmup)
                if finishing
                else lr_at(step - recipe.steps, recipe.tune_steps, recipe.tune_lr, recipe.warmup)
                if tuning
                else lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
            )
        features, mask = text_features(text_encoder, batch_captions, recipe.text_length)
        v = dit(z_sigma, sigma, features, mask)
        error = (v - (x0 - eps)).square()
        loss = error.mean()
        objective = loss
        if recipe.object_weight or recipe.contrast_power:
            # Weighted means as the VAE's: the object weights are normalised per batch, the clips' contrast
            # weights are not (their mean over the palette is 1).
            w = 1.0 + recipe.object_weight * cache_object[index] if recipe.object_weight else torch.ones(())
            c = clip_weights[index].view(-1, 1, 1, 1, 1) if recipe.contrast_power else 1.0
            objective = (error * w * c).mean() / w.mean()
        if recipe.word_consistency:  # drawn last, so the rest of the step's stream is unchanged
            partners, pairs = [], []
            for row, text in enumerate(batch_captions):
                found = partner_caption(text, gen)
                partners.append(found[0] if found else "")
                pairs += [(row, *shared) for shared in found[1]] if found else []
            _check_heldout_rule(partners)
            if pairs:
                partner_features, _ = text_features(text_encoder, partners, recipe.text_length)
                consistency = word_consistency_loss(features, partner_features, pairs)
                objective = objective + recipe.word_consistency * consistency
                total_consistency += float(consistency.detach())
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, models, min(recipe.ema_decay, (1 + step) / (10 + step)))
        step += 1
        last = float(loss.detach())
        total += last
        if step % recipe.log_every == 0 or step in (recipe.steps, tuned, end):
            n = (step - 1) % recipe.log_every + 1
            words = f" word consistency {total_consistency / n:.4f}" if recipe.word_consistency else ""
            log(
                f"dit step {step}/{end} loss {total / n:.5f}{words} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t0) / n:.2f} s/step"
            )
            total, total_consistency, t0 = 0.0, 0.0, time.time()
        if step % recipe.checkpoint_every == 0 or step in (recipe.steps, tuned, end):
            save_checkpoint(snapshot(), out / DIT_CHECKPOINT)
    return snapshot()


def init_from_bundle(
    out: str | Path, preset: ModelPreset, bundle: str | Path, recipe: DiTRecipe = DiTRecipe(), log=print
) -> None:
    """Seed run folder ``out`` from an exported mochi bundle, so that ``train_dit`` goes on where the bundle's
    run stopped (its finishing phase, ``DiTRecipe.finish_steps``): a ``vae.ckpt`` with the bundle's encoder
    and decoder, and a ``dit.ckpt`` at step ``steps + tune_steps`` whose weights and EMA are the
    bundle's T5 and DiT (an export holds the EMA only), with a fresh optimizer and the bundle's latent
    statistics. A run folder that already holds a ``dit.ckpt`` is left as it is (the command resumes)."""
    from mochi.weights.bundle import load_bundle

    out = Path(out)
    if (out / DIT_CHECKPOINT).exists():
        log(f"dit: {out / DIT_CHECKPOINT} exists; --init {bundle} ignored, resuming")
        return
    components = load_bundle(bundle)
    dit = components.dit
    if dit.config != preset.dit and replace(preset.dit, depth=dit.config.depth) == dit.config:
        if preset.dit.depth < dit.config.depth:
            raise ValueError(
                f"bundle {str(bundle)!r} has a DiT of depth {dit.config.depth}; preset depth "
                f"{preset.dit.depth} cannot hold it (a DiT can be grown, not cut)"
            )
        dit = grow_dit(dit, preset.dit, recipe.seed)
        log(f"dit: grew the bundle's DiT from depth {components.dit.config.depth} to {preset.dit.depth}")
    parts = {
        "dit": (dit.config, preset.dit),
        "text_encoder": (components.text_encoder.config, preset.text_encoder),
        "encoder": (components.encoder.cfg, preset.encoder),
        "decoder": (components.decoder.cfg, preset.decoder),
    }
    wrong = [name for name, (have, want) in parts.items() if have != want]
    if wrong:
        raise ValueError(f"bundle {str(bundle)!r} does not hold the {', '.join(wrong)} of the preset trained")
    if components.latent_mean is None or components.latent_std is None:
        raise ValueError(f"bundle {str(bundle)!r} holds no latent statistics: its DiT's space is unknown")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / VAE_CHECKPOINT).exists():
        vae = {
            "encoder": components.encoder.state_dict(),
            "decoder": components.decoder.state_dict(),
            "step": 0,
            "encoder_steps": 0,
            "from_bundle": str(bundle),
        }
        save_checkpoint(vae, out / VAE_CHECKPOINT)
    models = torch.nn.ModuleDict({"text_encoder": components.text_encoder, "dit": dit})
    opt = torch.optim.AdamW(models.parameters(), lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.01)
    weights = {k: v.detach().clone() for k, v in models.state_dict().items()}
    state = {
        "model": weights,
        "ema": {n: p.detach().clone() for n, p in models.named_parameters()},
        "optimizer": opt.state_dict(),
        "configs": preset_configs(preset, DIT_PARTS),
        "step": recipe.steps + recipe.tune_steps,
        "loss": float("nan"),
        "latent_mean": [float(v) for v in components.latent_mean],
        "latent_std": [float(v) for v in components.latent_std],
    }
    save_checkpoint(state, out / DIT_CHECKPOINT)
    log(f"dit: {out} starts from bundle {bundle} at step {state['step']}")


def grow_dit(dit: AsymmDiT, config: DiTConfig, seed: int) -> AsymmDiT:
    """A DiT of ``config`` (``dit``'s config but deeper) that computes what ``dit`` does: ``dit``'s blocks,
    its last block (the one that leaves the text stream alone) still last, and the new blocks inserted before
    it, drawn at random but with their gates zero (tanh(0) = 0: each new block passes both streams
    through). Training then opens the gates (adaLN-zero style growth)."""
    old, new = dit.config.depth, config.depth
    torch.manual_seed(seed)
    grown = AsymmDiT(config)
    state = dict(grown.state_dict())
    for key, value in dit.state_dict().items():
        if key.startswith(f"blocks.{old - 1}."):
            key = f"blocks.{new - 1}." + key[len(f"blocks.{old - 1}.") :]
        state[key] = value
    with torch.no_grad():
        for i in range(old - 1, new - 1):
            for stream, width in (("x", config.hidden_size_x), ("y", config.hidden_size_y)):
                for chunk in (1, 3):  # (scale_msa, gate_msa, scale_mlp, gate_mlp)
                    rows = slice(chunk * width, (chunk + 1) * width)
                    state[f"blocks.{i}.mod_{stream}.weight"][rows] = 0.0
                    state[f"blocks.{i}.mod_{stream}.bias"][rows] = 0.0
    grown.load_state_dict(state)
    return grown

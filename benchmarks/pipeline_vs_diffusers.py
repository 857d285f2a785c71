"""One whole video, end to end, with identical components: mochi's pipeline vs diffusers' MochiPipeline.

    PYTHONPATH=src python benchmarks/pipeline_vs_diffusers.py [--dit small] [--frames 13] [--size 64]
        [--steps 8] [--guidance 4.5]

Both pipelines hold the same tensors (random init, fp32): a DiT preset converted through the key map, the
tiny VAE, a small T5 (ours and transformers' T5EncoderModel) and one word-level tokenizer. Each run is
text encoding + guided sampling + VAE decode to frames. Peak memory: see measure.py. Prints seconds and
peak memory of each and the ratios, and how far the two agree: the final latents (up to rounding at
``--guidance 1``; guided, diffusers encodes the empty negative prompt as one end token where Genmo and we
use none) and the frames (diffusers' VAE decoder also differs from Genmo's in the first frames).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from measure import at_least, measure, ratio_line, reexec_with_mmap_malloc

reexec_with_mmap_malloc()

import torch  # noqa: E402

from mochi.models.dit import DIT_PRESETS, AsymmDiT  # noqa: E402
from mochi.models.t5 import T5Config, T5Encoder  # noqa: E402
from mochi.models.tokenizer import JsonTokenizer  # noqa: E402
from mochi.models.vae import DECODER_PRESETS, ENCODER_PRESETS, Decoder, Encoder  # noqa: E402
from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.request import GenerationRequest  # noqa: E402
from mochi.sampling.sampler import initial_noise  # noqa: E402
from mochi.weights.components import Components  # noqa: E402
from mochi.weights.keymaps.dit_diffusers import diffusers_model  # noqa: E402
from mochi.weights.keymaps.vae_diffusers import decoder_pairs, encoder_pairs, to_diffusers  # noqa: E402

PROMPT = "a red circle moving right on a gray background"


def tokenizer_file(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted(set(PROMPT.split()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # As T5's tokenizer.json: </s> after the text. Ours appends it itself; diffusers' tokenizer needs this.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def build(args: argparse.Namespace, folder: Path):
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler
    from diffusers import MochiPipeline as DiffusersMochi
    from transformers import PreTrainedTokenizerFast, T5EncoderModel
    from transformers import T5Config as HFT5Config

    torch.manual_seed(0)
    cfg = DIT_PRESETS[args.dit]
    t5cfg = T5Config(vocab_size=64, d_model=cfg.t5_feat_dim, d_kv=64, num_heads=8, d_ff=1024, num_layers=2)
    t5 = T5Encoder(t5cfg)
    t5.initialize_weights()
    dit, dec, enc = AsymmDiT(cfg), Decoder(DECODER_PRESETS["tiny"]), Encoder(ENCODER_PRESETS["tiny"])
    tok_path = tokenizer_file(folder)
    defaults = {"frames": args.frames, "height": args.size, "width": args.size, "steps": args.steps}
    comps = Components(
        JsonTokenizer(tok_path), t5, dit, dec, enc, defaults={**defaults, "guidance": args.guidance}
    )
    for m in comps.modules():
        m.eval().requires_grad_(False)
    ours = MochiPipeline(comps, device="cpu", dit_dtype=torch.float32)

    transformer = diffusers_model(dit)
    vae = AutoencoderKLMochi(
        encoder_block_out_channels=tuple(enc.cfg.channels),
        decoder_block_out_channels=tuple(dec.cfg.channels),
        layers_per_block=tuple(dec.cfg.num_res_blocks),
    )
    sd = to_diffusers(dec.state_dict(), decoder_pairs(dec.cfg)) | to_diffusers(
        enc.state_dict(), encoder_pairs(enc.cfg)
    )
    vae.load_state_dict(sd, strict=True)
    text_encoder = T5EncoderModel(HFT5Config(**t5cfg.to_hf()))
    text_encoder.load_state_dict(t5.state_dict(), strict=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=256,
    )
    theirs = DiffusersMochi(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def timed_stages(pipe) -> dict[str, float]:
    """Wrap diffusers' pipeline so that its runs add their seconds per stage into the dict returned: text
    (``encode_prompt``), denoise (every transformer call), decode (``vae.decode``); the rest of a run
    (scheduler, latents, post-processing) is what the whole run took beyond them."""
    seconds = {"text": 0.0, "denoise": 0.0, "decode": 0.0}

    def timed(stage, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - start

        return run

    pipe.encode_prompt = timed("text", pipe.encode_prompt)
    pipe.transformer.forward = timed("denoise", pipe.transformer.forward)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dit", default="small", choices=sorted(DIT_PRESETS), help="DiT preset (not the 10B one)")
    p.add_argument("--frames", type=int, default=13)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    # One step: diffusers' linear-quadratic schedule divides by zero.
    at_least(p, ("--repeats", args.repeats, 1), ("--steps", args.steps, 2))
    torch.set_num_threads(args.threads)
    if args.dit == "mochi-1-preview":
        raise SystemExit("the 10B preset does not fit this benchmark; use small or full-width-2")

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build(args, Path(tmp))
    request = GenerationRequest(PROMPT, negative_prompt="", seed=0)
    shape = (1, 12, (args.frames - 1) // 6 + 1, args.size // 8, args.size // 8)

    def run_ours():
        with torch.inference_mode():
            return ours.generate(request)

    def run_theirs(output_type: str = "pt"):
        with torch.inference_mode():
            return theirs(
                prompt=PROMPT,
                negative_prompt="",
                height=args.size,
                width=args.size,
                num_frames=args.frames,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                latents=initial_noise(shape, 0),
                output_type=output_type,
            ).frames

    run_ours(), run_theirs()  # warm-up
    out_o, t_o, m_o = measure(run_ours, args.repeats)
    out_t, t_t, m_t = measure(run_theirs, args.repeats)
    print(
        f"DiT {args.dit}, {args.frames} frames {args.size}x{args.size}, {args.steps} steps, "
        f"guidance {args.guidance}"
    )
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(ratio_line("end to end (fp32, CPU)", (t_o, m_o), (t_t, m_t)))
    # Per stage: one more run of each, diffusers' with its stages timed (ours records its own).
    stages = timed_stages(theirs)
    started = time.perf_counter()
    run_theirs()
    stages["other"] = time.perf_counter() - started - sum(stages.values())
    ours_stages = run_ours().seconds
    print("per stage (s), ours / diffusers:")
    for stage in ("text", "denoise", "decode"):
        o, t = ours_stages[stage], stages[stage]
        print(f"  {stage:8s} {o:7.2f} / {t:7.2f}  ({t / o:.2f}x)")
    print(f"  other    {'':7s}   {stages['other']:7.2f}  (diffusers: scheduler, latents, post-processing)")
    # Reported for the record, not asserted. Diffusers encodes "" as one end token where Genmo (and we) use
    # zero tokens, so guided latents differ by design; unguided ones agree up to rounding.
    theirs_latents = run_theirs("latent")
    err = ((out_o.latents - theirs_latents).norm() / theirs_latents.norm()).item()
    print(
        f"final latents: relative difference {err:.1e} (rounding only at --guidance 1; else the empty prompt)"
    )
    # Diffusers' VAE decoder also differs from Genmo's in the first frames (benchmarks/vae_vs_diffusers.py).
    ours_frames = out_o.frames[0].float() / 255
    theirs_frames = out_t[0].permute(0, 2, 3, 1).float()
    print(
        "mean |frame difference| (small, not zero, by design): "
        f"{(ours_frames - theirs_frames).abs().mean():.4f}"
    )


if __name__ == "__main__":
    main()

import dataclasses
import time

import pytest
import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.models.t5 import T5_PRESETS, T5Encoder
from mochi.models.tokenizer import ByteTokenizer
from mochi.models.vae import DECODER_PRESETS, ENCODER_PRESETS, Decoder, Encoder
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.sampling.sampler import initial_noise
from mochi.weights.components import Components

DEFAULTS = {"frames": 7, "height": 32, "width": 32, "steps": 3, "guidance": 4.0}


def tiny_components(seed: int = 0) -> Components:
    torch.manual_seed(seed)
    t5 = T5Encoder(T5_PRESETS["t5-tiny"])
    t5.initialize_weights()
    parts = [
        t5,
        AsymmDiT(DIT_PRESETS["tiny"]),
        Decoder(DECODER_PRESETS["tiny"]),
        Encoder(ENCODER_PRESETS["tiny"]),
    ]
    for m in parts:
        m.eval().requires_grad_(False)
    return Components(ByteTokenizer(), *parts, defaults=dict(DEFAULTS), name="test-tiny")


@pytest.fixture(scope="module")
def pipe():
    return MochiPipeline(tiny_components(), device="cpu")


def test_generate_shapes_dtype_and_seed(pipe):
    out = pipe.generate(GenerationRequest("a red circle moving right", seed=3))
    assert out.frames.shape == (1, 7, 32, 32, 3) and out.frames.dtype == torch.uint8
    assert out.latents.shape == (1, 12, 2, 4, 4)
    assert out.request.seed == 3 and out.request.steps == 3
    again = pipe.generate(GenerationRequest("a red circle moving right", seed=3))
    assert torch.equal(out.frames, again.frames)
    other = pipe.generate(GenerationRequest("a red circle moving right", seed=4))
    assert not torch.equal(out.latents, other.latents)


def test_several_prompts_equal_separate_calls(pipe):
    both = pipe.generate(GenerationRequest(["a red circle", "a blue square moving up"], seed=5))
    one = pipe.generate(GenerationRequest("a red circle", seed=5))
    assert both.frames.shape[0] == 2
    # One seed draws one noise tensor for the whole batch; the first sample sees the same noise as B=1.
    torch.testing.assert_close(both.latents[:1], one.latents, atol=1e-5, rtol=1e-5)


def test_ancestral_sampling_is_seeded_per_video(pipe):
    prompt = "a red circle moving right"
    euler = pipe.generate(GenerationRequest(prompt, seed=3))
    assert torch.equal(
        pipe.generate(GenerationRequest(prompt, seed=3, eta=0.0, eta_above=0.5)).latents, euler.latents
    )
    ancestral = pipe.generate(GenerationRequest(prompt, seed=3, eta=1.0))
    assert ancestral.request.eta == 1.0 and ancestral.request.eta_above == 0.0
    assert not torch.allclose(ancestral.latents, euler.latents)
    assert torch.equal(pipe.generate(GenerationRequest(prompt, seed=3, eta=1.0)).latents, ancestral.latents)
    # Two prompts of one request share the seed but not the fresh noise; the first matches B = 1.
    both = pipe.generate(GenerationRequest([prompt, prompt], seed=3, eta=1.0))
    torch.testing.assert_close(both.latents[:1], ancestral.latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both.latents[0], both.latents[1])
    # Above σ = 0.99 no step of the 3-step schedule re-noises but the first (from σ = 1).
    assert not torch.equal(
        pipe.generate(GenerationRequest(prompt, seed=3, eta=1.0, eta_above=0.99)).latents, euler.latents
    )


def test_batched_and_separate_guidance_agree(pipe):
    a = pipe.generate(GenerationRequest("a cyan square", seed=1, batch_cfg=True))
    b = pipe.generate(GenerationRequest("a cyan square", seed=1, batch_cfg=False))
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)


def test_guidance_one_skips_the_unconditional_pass(pipe, monkeypatch):
    batches = []
    dit = pipe.components.dit
    original = dit.forward

    def spy(x, *args, **kwargs):
        batches.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(dit, "forward", spy)
    pipe.generate(GenerationRequest("x", seed=0, guidance=1.0))
    assert batches == [1, 1, 1]
    batches.clear()
    pipe.generate(GenerationRequest("x", seed=0, guidance=[1.0, 3.0, 1.0]))
    assert batches == [1, 2, 1]


def test_progress_reports_every_stage(pipe):
    seen = []
    pipe.generate(
        GenerationRequest("x", seed=0), progress=lambda stage, done, total: seen.append((stage, done))
    )
    denoise = [s for s in seen if s[0] == "denoise"]
    assert denoise == [("denoise", 0), ("denoise", 1), ("denoise", 2), ("denoise", 3)]  # shown from the start
    assert seen[0] == ("text", 0) and seen[-1] == ("decode", 1)


def test_video_to_video_starts_from_the_clip(pipe):
    frames = torch.randint(0, 256, (7, 32, 32, 3), dtype=torch.uint8)
    steps_seen = []
    req = GenerationRequest("x", seed=0, steps=8, strength=0.5)
    out = pipe.generate(req, progress=lambda s, d, t: steps_seen.append(t) if s == "denoise" else None)
    v2v = pipe.generate(
        req, init_frames=frames, progress=lambda s, d, t: steps_seen.append(-t) if s == "denoise" else None
    )
    assert out.frames.shape == v2v.frames.shape
    full = max(steps_seen)
    partial = -min(steps_seen)
    assert full == 8 and 0 < partial < 8
    # A custom schedule may start below 1 only from a clip: text-to-video starts from pure noise at 1.0.
    low = GenerationRequest("x", seed=0, sigmas=[0.9, 0.5, 0.0], strength=0.5)
    assert pipe.generate(low, init_frames=frames).frames.shape == out.frames.shape
    with pytest.raises(ValueError, match=r"sigmas start at 0.9, but text-to-video starts from pure noise"):
        pipe.generate(low)


def test_video_to_video_from_the_requests_file(pipe, tmp_path):
    from mochi.video import fit_frames, read_video, write_video

    clip = write_video(torch.randint(0, 256, (9, 48, 40, 3), dtype=torch.uint8), tmp_path / "clip.mp4")
    req = GenerationRequest("x", seed=0, steps=8, strength=0.5, init_video=str(clip))
    fitted = torch.from_numpy(fit_frames(read_video(clip, max_frames=7)[0], 7, 32, 32))
    by_file = pipe.generate(req).latents
    by_frames = dataclasses.replace(req, init_video=None)
    assert by_file.equal(pipe.generate(by_frames, init_frames=fitted).latents)
    assert not by_file.equal(pipe.generate(GenerationRequest("x", seed=0, steps=8)).latents)
    with pytest.raises(ValueError, match="does not exist"):
        pipe.generate(GenerationRequest("x", seed=0, init_video=str(tmp_path / "none.mp4")))
    # Both sources at once: refused (init_video was ignored, yet recorded in the result's request).
    with pytest.raises(ValueError, match=r"init_frames and init_video='.*clip.mp4' both give the clip"):
        pipe.generate(req, init_frames=fitted)
    # A numpy array (what mochi.video.fit_frames returns) is taken as it is: it was refused as "init_frames
    # are uint8; give uint8 RGB frames".
    assert by_file.equal(pipe.generate(by_frames, init_frames=fitted.numpy()).latents)
    # Frames given directly are uint8 at the request's size, or a clear error.
    # A reversed view (OpenCV's BGR to RGB) failed inside torch: "At least one stride ... is negative".
    bgr = fitted.numpy()[..., ::-1]
    assert pipe.generate(by_frames, init_frames=bgr).latents.equal(
        pipe.generate(by_frames, init_frames=torch.from_numpy(bgr.copy())).latents
    )
    with pytest.raises(TypeError, match=r"init_frames is a list; give a uint8 tensor or numpy array"):
        pipe.generate(by_frames, init_frames=fitted.tolist())
    with pytest.raises(ValueError, match=r"init_frames are float32; give uint8 RGB frames"):
        pipe.generate(by_frames, init_frames=fitted.float() / 255)
    with pytest.raises(
        ValueError, match=r"init_frames have shape \(7, 32, 16, 3\); this request needs \(7, 32, 32, 3\)"
    ):
        pipe.generate(by_frames, init_frames=fitted[:, :, :16])


def test_video_to_video_encodes_the_pixels_in_float32_at_any_vae_dtype():
    # The encoder's Fourier features turn x by 2π·2^7·x: pixels rounded to bf16 before them (up to 2^-9)
    # moved those phases by radians, and the latent by a tenth of its scale.
    from mochi.models.latents import vae_to_dit
    from mochi.models.vae_tiling import encode

    pipe16 = MochiPipeline(tiny_components(), device="cpu", vae_dtype="bf16")
    frames = torch.randint(0, 256, (1, 7, 32, 32, 3), dtype=torch.uint8)
    x = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    mean, _ = encode(pipe16.components.encoder, x)
    assert pipe16.encode_frames(frames).equal(vae_to_dit(mean, pipe16._latent_stats))


def test_bad_request_fails_before_any_work(pipe):
    with pytest.raises(ValueError, match="frames=8 is not of the form 6k"):
        pipe.generate(GenerationRequest("x", frames=8))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"offlaod": True}, TypeError, r"unknown option 'offlaod'; did you mean 'offload'\?"),
        ({"fp8": "no-such-mode"}, ValueError, r"fp8='no-such-mode' is not a valid mode; choose one of keep"),
        (
            {"max_memory": float("nan")},
            ValueError,
            r"max_memory=nan must be a positive whole number of bytes",
        ),
        ({"max_memory": "8GB"}, ValueError, r"max_memory='8GB' must be a positive whole number"),
        (
            {"dit_dtype": torch.float64},
            ValueError,
            r"dtype torch.float64 is not supported; choose one of fp32",
        ),
        ({"vae_dtype": 16}, ValueError, r"dtype 16 is not a dtype; choose one of fp32"),
        ({"offload": "blocks:²"}, ValueError, r"offload 'blocks:²' is not understood"),
        ({"compile": "no"}, ValueError, r"compile='no' must be True or False"),
        # torch.device's own many-line TypeError ("received an invalid combination of arguments")
        ({"device": 1.5}, ValueError, r"^device 1.5 is not a device name; use cpu, cuda or cuda:N$"),
        ({"device": True}, ValueError, r"^device True is not a device name; use cpu, cuda or cuda:N$"),
    ],
)
def test_from_pretrained_checks_its_options_before_loading(monkeypatch, options, error, message):
    import mochi.pipeline

    if set(options) <= {"offlaod", "fp8"}:  # refused before any loading: a load would fail the test
        monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded"))
    else:
        monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    with pytest.raises(error, match=message):
        MochiPipeline.from_pretrained(**options)


def test_a_custom_schedule_refuses_the_default_schedules_options():
    with pytest.raises(ValueError, match=r"linear_steps=1 shapes the default schedule, which sigmas replace"):
        GenerationRequest("x", sigmas=[1.0, 0.5, 0.0], linear_steps=1).validate()
    with pytest.raises(ValueError, match=r"threshold_noise=0.9 shapes the default schedule"):
        GenerationRequest("x", sigmas=[1.0, 0.5, 0.0], threshold_noise=0.9).validate()
    GenerationRequest("x", sigmas=[1.0, 0.5, 0.0]).validate()
    with pytest.raises(ValueError, match=r"cache=1 must be a name such as 'none'"):
        GenerationRequest("x", cache=1).validate()


@pytest.mark.parametrize("negative", ["a gray blur", ""])
def test_latents_match_diffusers_mochi_pipeline(pipe, negative):
    """Identical weights, sigmas, noise and text embeddings → the same latents as diffusers (fp32).

    The empty negative prompt is Genmo's zero-token prompt; diffusers encodes "" as one end token, so it is
    given our embeddings and mask rather than its own (diffusers-mochi.md §4.5).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import MochiPipeline as DiffusersMochi

    from mochi.weights.keymaps.dit_diffusers import diffusers_model

    theirs = diffusers_model(pipe.components.dit)
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    peer = DiffusersMochi(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=theirs
    )

    prompt = "a yellow triangle moving down"
    ours = pipe.generate(GenerationRequest(prompt, negative_prompt=negative, seed=11, steps=4, guidance=4.5))
    feats, mask = pipe.encode_text([prompt, negative])
    noise = initial_noise(ours.latents.shape, 11)
    out = peer(
        prompt_embeds=feats[:1],
        prompt_attention_mask=mask[:1],
        negative_prompt_embeds=feats[1:],
        negative_prompt_attention_mask=mask[1:],
        latents=noise,
        height=32,
        width=32,
        num_frames=7,
        num_inference_steps=4,
        guidance_scale=4.5,
        output_type="latent",
    ).frames
    scale = ours.latents.abs().max()
    assert (out - ours.latents).abs().max() <= 1e-4 * scale


def test_what_would_fail_after_sampling_fails_before_it(pipe):
    """A max_memory no decode split fits was found after all the sampling; a negative prompt on a clip whose
    remaining steps are all unguided was silently ignored."""
    seen = []
    small = MochiPipeline(tiny_components(), device="cpu", max_memory=10**5)
    with pytest.raises(ValueError, match="max_memory 100000 bytes is too small"):
        small.generate(GenerationRequest("x", seed=0, steps=2), progress=lambda *a: seen.append(a[0]))
    assert "denoise" not in seen
    clip = torch.zeros((7, 32, 32, 3), dtype=torch.uint8)
    request = GenerationRequest(
        "x", seed=0, steps=8, strength=0.3, guidance=[5.0] * 6 + [1.0, 1.0], negative_prompt="a blue square"
    )
    with pytest.raises(
        ValueError, match=r"negative_prompt='a blue square' needs guidance other than 1.0, and the 1 steps"
    ):
        pipe.generate(request, init_frames=clip)


def test_results_are_ordinary_tensors_and_record_the_loras_that_ran(tmp_path):
    """generate ran under ``torch.inference_mode()``: its frames and latents refused in-place edits and
    autograd outside it. A request naming no LoRA, after one that named one, ran with it applied (loaded
    LoRAs stay, docs/lora.md) but its request and run record said none."""
    from mochi.weights.lora import save_lora

    from .test_lora import random_lora

    pipe = MochiPipeline(tiny_components(), device="cpu")
    request = GenerationRequest("x", seed=3, steps=2, frames=7)
    result = pipe.generate(request)
    assert not result.frames.is_inference() and not result.latents.is_inference()
    result.frames[:, :, :2] = 255  # in place, outside inference mode
    weight = torch.ones_like(result.latents, requires_grad=True)
    (result.latents * weight).sum().backward()
    assert torch.equal(weight.grad, result.latents)
    path = save_lora(random_lora(pipe.components.dit, seed=4), tmp_path / "style.safetensors")
    with_lora = pipe.generate(dataclasses.replace(request, loras=[(str(path), 1.0)]))
    after = pipe.generate(request)
    assert after.request.loras == [(str(path), 1.0)] and pipe.run_record(after)["lora_merge"] is False
    assert torch.equal(after.latents, with_lora.latents)


def test_inputs_of_generate_are_checked_before_any_work(tmp_path):
    """Wrong init_frames were refused only after the request's LoRAs went on and T5 ran; a progress or
    denoised that is no function failed after the text stage or the first DiT step; encode_frames read
    float frames in [0, 1] as 0-255 levels and a 4-D clip failed in permute."""
    from mochi.weights.lora import save_lora

    from .test_lora import random_lora

    pipe = MochiPipeline(tiny_components(), device="cpu")
    path = save_lora(random_lora(pipe.components.dit, seed=4), tmp_path / "style.safetensors")
    seen = []
    request = GenerationRequest("x", seed=3, steps=2, frames=13, loras=[(str(path), 1.0)])
    with pytest.raises(ValueError, match=r"init_frames have shape \(7, 64, 64, 3\); this request needs"):
        pipe.generate(
            request, lambda *a: seen.append(a), init_frames=torch.zeros(7, 64, 64, 3, dtype=torch.uint8)
        )
    assert seen == [] and pipe.loras == []
    for name in ("progress", "denoised"):
        with pytest.raises(TypeError, match=rf"^{name}=True is not callable; give a function {name}\("):
            pipe.generate(request, **{name: True})
    assert pipe.loras == []
    with pytest.raises(ValueError, match="frames are float32; give uint8 RGB frames"):
        pipe.encode_frames(torch.rand(1, 7, 64, 64, 3))
    with pytest.raises(ValueError, match=r"frames have shape \(7, 64, 64, 3\); give \(batch, frames"):
        pipe.encode_frames(torch.zeros(7, 64, 64, 3, dtype=torch.uint8))


def test_a_lora_path_that_names_nothing_and_a_merge_that_is_no_bool_are_refused(tmp_path, monkeypatch):
    """A LoRA path "" was Path(""), the current folder, whose one .safetensors file was read as the LoRA (a
    model's file would have failed, another LoRA applied silently); merge="no" is truthy and merged, and the
    run record said lora_merge "no"."""
    from mochi.weights.io import WeightsError
    from mochi.weights.lora import save_lora

    from .test_lora import random_lora

    pipe = MochiPipeline(tiny_components(), device="cpu")
    save_lora(random_lora(pipe.components.dit, seed=4), tmp_path / "other.safetensors")
    monkeypatch.chdir(tmp_path)  # a folder holding one LoRA: "" read it
    for path, message in (
        ("", "LoRA path '' is empty; name the LoRA file (or its PEFT folder)"),
        (3, "LoRA path 3 must be a path (a string), not int"),
    ):
        with pytest.raises(WeightsError) as e:
            pipe.load_lora(path)
        assert str(e.value) == message
    request = GenerationRequest("x", seed=3, steps=2, frames=7, loras=[("", 1.0)])
    with pytest.raises(ValueError) as e:
        pipe.generate(request)
    assert str(e.value) == "loras entry ('', 1.0): the path is empty; name the LoRA file"
    with pytest.raises(ValueError) as e:
        pipe.load_lora("other.safetensors", merge="no")
    assert str(e.value) == "merge='no' must be True or False"
    pipe.lora_merge = "no"
    with pytest.raises(ValueError) as e:
        pipe.generate(dataclasses.replace(request, loras=[("other.safetensors", 1.0)]))
    assert str(e.value) == "lora_merge='no' must be True or False"
    assert pipe.loras == []


def test_a_lora_loaded_from_another_thread_waits_for_the_running_request(tmp_path):
    """load_lora took no lock: from another thread, while a request ran, it went on between two of the
    request's steps, which then ran with it (a video neither with nor without the LoRA)."""
    import threading

    from mochi.weights.lora import save_lora

    from .test_lora import random_lora

    pipe = MochiPipeline(tiny_components(), device="cpu")
    path = save_lora(random_lora(pipe.components.dit, seed=4), tmp_path / "style.safetensors")
    request = GenerationRequest("x", seed=3, steps=3, frames=7)
    base = pipe.generate(request)
    loaders = []

    def denoised(step, total, x0):
        if step == 1:
            loader = threading.Thread(target=pipe.load_lora, args=(str(path), 2.0))
            loader.start()
            loader.join(0.5)  # it waits for the request: still running
            loaders.append(loader.is_alive())

    out = pipe.generate(request, denoised=denoised)
    assert loaders == [True] and torch.equal(out.latents, base.latents)
    deadline = time.monotonic() + 30
    while not pipe.loras and time.monotonic() < deadline:  # then it goes on
        time.sleep(0.01)
    assert [(p, s) for p, s, _ in pipe.loras] == [(str(path), 2.0)]

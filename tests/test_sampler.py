import pytest
import torch

from mochi.sampling.sampler import apply_guidance, euler_step, initial_noise, noise_to, sample, step_noise
from mochi.sampling.schedules import linear_quadratic_schedule, truncate_schedule

SHAPE = (2, 3, 2, 4, 4)


def text(value: float, batch: int = 2, length: int = 5, dim: int = 6):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :3] = True
    return torch.full((batch, length, dim), value), mask


class ConstantModel:
    """v = the mean of the valid text features, broadcast; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, feats, mask):
        self.calls.append((x.shape[0], sigma.clone(), feats[:, 0, 0].clone()))
        v = (feats * mask[..., None]).sum((1, 2)) / (mask.sum(1) * feats.shape[2])
        return v.view(-1, 1, 1, 1, 1).expand_as(x).clone()


def test_hand_computed_constant_velocity():
    z0 = torch.randn(SHAPE)
    model = ConstantModel()
    # cond v = 2, uncond v = 1: guided v = 1 + 3·(2 − 1) = 4 at step 0; guidance 1.0 at step 1 gives v = 2.
    out = sample(model, z0, [1.0, 0.75, 0.0], text(2.0), text(1.0), guidance=[3.0, 1.0])
    torch.testing.assert_close(out, z0 + 0.25 * 4 + 0.75 * 2, rtol=0, atol=1e-6)
    assert [c[0] for c in model.calls] == [4, 2]  # one batched forward, then the cond pass alone
    assert model.calls[0][2].tolist() == [2.0, 2.0, 1.0, 1.0]  # [cond, uncond] order, as Genmo


def test_sigma_argument_and_separate_passes():
    model = ConstantModel()
    sample(model, torch.zeros(SHAPE), [1.0, 0.5, 0.0], text(2.0), text(1.0), guidance=6.0, batch_cfg=False)
    assert [c[0] for c in model.calls] == [2, 2, 2, 2]
    assert [c[2].tolist() for c in model.calls] == [[2.0, 2.0], [1.0, 1.0]] * 2  # cond, then uncond
    sigma = model.calls[2][1]
    assert sigma.dtype == torch.float32 and sigma.tolist() == [0.5, 0.5]


class ExactFlowModel:
    """The exact velocity for data concentrated at one point x*: v = x* − ε = (x* − z)/σ."""

    def __init__(self, target):
        self.target = target

    def __call__(self, x, sigma, feats, mask):
        return (self.target.repeat(x.shape[0] // self.target.shape[0], 1, 1, 1, 1) - x) / sigma.view(
            -1, 1, 1, 1, 1
        )


def test_euler_on_straight_paths_lands_on_the_data():
    target = torch.randn(SHAPE)
    noise = initial_noise(SHAPE, seed=3)
    for sigmas in (linear_quadratic_schedule(7), [1.0, 0.0], linear_quadratic_schedule(64)):
        out = sample(ExactFlowModel(target), noise, sigmas, text(1.0), guidance=1.0)
        torch.testing.assert_close(out, target, rtol=0, atol=1e-5)


def test_video_to_video_start_sigma():
    target, z0 = torch.randn(SHAPE), torch.randn(SHAPE)
    noise = initial_noise(SHAPE, seed=0)
    sigmas = truncate_schedule(linear_quadratic_schedule(16), 0.6)
    start = noise_to(z0, sigmas[0], noise)
    torch.testing.assert_close(start, 0.4 * z0 + 0.6 * noise)
    steps = []
    out = sample(
        ExactFlowModel(target), start, sigmas, text(1.0), guidance=1.0, callback=lambda *a: steps.append(a)
    )
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)
    assert steps[0] == (1, len(sigmas) - 1, sigmas[1]) and steps[-1] == (
        len(sigmas) - 1,
        len(sigmas) - 1,
        0.0,
    )


class NonlinearModel:
    def __call__(self, x, sigma, feats, mask):
        t = (feats * mask[..., None]).sum((1, 2)).view(-1, 1, 1, 1, 1)
        return torch.tanh(x * t) - sigma.view(-1, 1, 1, 1, 1) * x


def test_batched_and_separate_cfg_agree():
    z = initial_noise(SHAPE, seed=1)
    cond = (torch.randn(2, 5, 6), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool))
    null = (torch.zeros(1, 5, 6), torch.zeros(1, 5, dtype=torch.bool))  # batch 1 broadcasts
    sigmas = linear_quadratic_schedule(6)
    a = sample(NonlinearModel(), z, sigmas, cond, null, guidance=4.5, batch_cfg=True)
    b = sample(NonlinearModel(), z, sigmas, cond, null, guidance=4.5, batch_cfg=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Against a hand-written loop of the reference update.
    ref = z.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((2,), s)
        c = NonlinearModel()(ref, sig, *cond)
        u = NonlinearModel()(ref, sig, null[0].expand(2, -1, -1), null[1].expand(2, -1))
        ref = ref + (s - s_next) * (u + 4.5 * (c - u))
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-6)


def test_pure_functions():
    c, u = torch.tensor([3.0]), torch.tensor([1.0])
    assert apply_guidance(c, u, 6.0).item() == 13.0
    assert apply_guidance(c.bfloat16(), u.bfloat16(), 1.5).dtype == torch.float32
    assert euler_step(torch.tensor([1.0]), torch.tensor([2.0]), 0.75, 0.25).item() == 2.0


def test_initial_noise_is_seeded_on_cpu():
    a = initial_noise((1, 12, 2, 3, 4), seed=1710977262)
    b = initial_noise((1, 12, 2, 3, 4), seed=1710977262, device="meta")
    want = torch.randn((1, 12, 2, 3, 4), generator=torch.Generator().manual_seed(1710977262))
    assert torch.equal(a, want) and a.dtype == torch.float32
    assert b.device.type == "meta" and b.shape == a.shape
    assert not torch.equal(a, initial_noise((1, 12, 2, 3, 4), seed=1))


def test_errors():
    z = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="guidance schedule has 3 values but the sigma schedule has 2 steps"):
        sample(ConstantModel(), z, [1.0, 0.5, 0.0], text(1.0), text(0.0), guidance=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="needs null_text"):
        sample(ConstantModel(), z, [1.0, 0.0], text(1.0), guidance=6.0)
    with pytest.raises(ValueError, match="text has batch 3 but the latents have batch 2"):
        sample(ConstantModel(), z, [1.0, 0.0], text(1.0, batch=3), guidance=1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(ConstantModel(), z, [0.5, 1.0], text(1.0), guidance=1.0)
    with pytest.raises(ValueError, match="noise shape"):
        noise_to(z, 0.5, torch.zeros(1))


def test_ancestral_step_by_hand_and_eta_zero_is_euler():
    target = torch.randn(SHAPE)
    noise = initial_noise(SHAPE, seed=3)
    sigmas = [1.0, 0.6, 0.2, 0.0]
    euler = sample(ExactFlowModel(target), noise, sigmas, text(1.0), guidance=1.0)
    assert torch.equal(
        sample(ExactFlowModel(target), noise, sigmas, text(1.0), guidance=1.0, eta=0.0, noise_seeds=[1, 2]),
        euler,
    )
    # Above σ = 0.5 only: the first step re-noises, the others are Euler steps. The exact model's x0 is the
    # target and its ε the true noise, so z after step 0 is 0.4·x* + 0.6·(√(1 − η²)·ε + η·ξ).
    seen = []
    out = sample(
        ExactFlowModel(target),
        noise,
        sigmas,
        text(1.0),
        guidance=1.0,
        eta=0.6,
        eta_above=0.5,
        noise_seeds=[7, 8],
        denoised=lambda i, n, x0: seen.append(x0),
    )
    fresh = torch.cat([step_noise((1, *SHAPE[1:]), s, 0) for s in (7, 8)])
    z1 = 0.4 * target + 0.6 * (0.8 * noise + 0.6 * fresh)
    torch.testing.assert_close(seen[1], target, rtol=0, atol=1e-5)  # x0 at step 1 from z1: still the target
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)
    z_again = sample(
        ExactFlowModel(target), noise, sigmas[:2], text(1.0), guidance=1.0, eta=0.6, noise_seeds=[7, 8]
    )
    torch.testing.assert_close(z_again, z1, rtol=0, atol=1e-6)


def test_ancestral_noise_is_per_video_and_per_step():
    a = step_noise((1, 12, 2, 3, 4), seed=5, step=0)
    assert torch.equal(a, step_noise((1, 12, 2, 3, 4), seed=5, step=0)) and a.dtype == torch.float32
    assert not torch.equal(a, step_noise((1, 12, 2, 3, 4), seed=5, step=1))
    assert not torch.equal(a, step_noise((1, 12, 2, 3, 4), seed=6, step=0))
    # Not another seed's initial noise (seed + k would be).
    assert not any(torch.equal(a, initial_noise((1, 12, 2, 3, 4), seed=s)) for s in range(4, 10))
    # One seed, one video: a row's result does not depend on the rows beside it.
    model = ConstantModel()
    z = torch.cat([initial_noise((1, *SHAPE[1:]), s) for s in (5, 6)])
    both = sample(model, z, [1.0, 0.7, 0.3, 0.0], text(1.0), guidance=1.0, eta=1.0, noise_seeds=[5, 6])
    one = sample(
        model, z[1:], [1.0, 0.7, 0.3, 0.0], text(1.0, batch=1), guidance=1.0, eta=1.0, noise_seeds=[6]
    )
    torch.testing.assert_close(both[1:], one, rtol=0, atol=0)
    euler = sample(model, z, [1.0, 0.7, 0.3, 0.0], text(1.0), guidance=1.0)
    assert not torch.allclose(both, euler)


def test_ancestral_errors():
    z = torch.zeros(SHAPE)
    args = (ConstantModel(), z, [1.0, 0.0], text(1.0))
    with pytest.raises(ValueError, match=r"eta=1.5 must lie in \[0, 1\].*nearest valid: 1"):
        sample(*args, guidance=1.0, eta=1.5, noise_seeds=[0, 1])
    with pytest.raises(ValueError, match=r"eta_above=1.0 must lie in \[0, 1\).*nearest valid: 0.99"):
        sample(*args, guidance=1.0, eta=0.5, eta_above=1.0, noise_seeds=[0, 1])
    with pytest.raises(ValueError, match="eta=0.5 needs one noise seed per video: got none for a batch of 2"):
        sample(*args, guidance=1.0, eta=0.5)
    with pytest.raises(ValueError, match="got 1 for a batch of 2"):
        sample(*args, guidance=1.0, eta=0.5, noise_seeds=[3])


@pytest.mark.gpu
def test_same_seed_same_noise_on_cuda():
    assert torch.equal(initial_noise(SHAPE, seed=5, device="cuda").cpu(), initial_noise(SHAPE, seed=5))


def test_eta_1_is_diffusers_stochastic_flow_sampling_given_the_same_noise(monkeypatch):
    """η = 1 at every step is the step of diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    (the peer of this option): x0 = z + σ·v, then (1 − σ')·x0 + σ'·ξ. The fresh noise of both is replaced
    by one list of tensors, so only the arithmetic is compared."""
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_flow_match_euler_discrete as flow_match

    import mochi.sampling.sampler as sampler_module

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 3, generator=gen) * 0.5

    def model(x, sigma, feats, mask):  # a velocity that depends on z and σ, so the noise matters downstream
        return torch.einsum("oc,bcthw->bothw", weight, x) + 0.3 * sigma.view(-1, 1, 1, 1, 1)

    sigmas = linear_quadratic_schedule(8)
    shape = (1, *SHAPE[1:])
    noises = [torch.randn(shape, generator=gen) for _ in sigmas]
    z = initial_noise(shape, seed=4)
    monkeypatch.setattr(
        sampler_module, "step_noise", lambda shape, seed, step, device=None, row=0: noises[step]
    )
    ours = sample(model, z, sigmas, text(1.0, batch=1), guidance=1.0, eta=1.0, noise_seeds=[4])

    drawn = iter(noises)
    monkeypatch.setattr(flow_match, "randn_tensor", lambda *a, **k: next(drawn))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=sigmas[:-1])
    assert scheduler.sigmas.tolist() == pytest.approx(sigmas)
    theirs = z.clone()
    for t, sigma in zip(scheduler.timesteps, sigmas):
        velocity = -model(theirs, torch.tensor([sigma]), None, None)  # diffusers' flow output is ε − x0
        theirs = scheduler.step(velocity, t, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, sample(model, z, sigmas, text(1.0, batch=1), guidance=1.0), atol=1e-2)

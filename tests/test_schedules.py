import re
from fractions import Fraction

import pytest

from mochi.sampling.schedules import linear_quadratic_schedule, truncate_schedule, validate_sigmas

# genmo-mochi.md §3.1, printed to 6 decimals: 33 linear values 1 − i/1280, then the quadratic part.
REFERENCE_64 = [1.0 - i * 0.00078125 for i in range(33)] + [
    0.973291, 0.969727, 0.964307, 0.957031, 0.9479, 0.936914, 0.924072, 0.909375, 0.892822, 0.874414,
    0.85415, 0.832031, 0.808057, 0.782227, 0.754541, 0.725, 0.693604, 0.660352, 0.625244, 0.588281,
    0.549463, 0.508789, 0.46626, 0.421875, 0.375635, 0.327539, 0.277588, 0.225781, 0.172119, 0.116602,
    0.059229, 0.0,
]  # fmt: skip


def exact_schedule(n: int, tau: Fraction, lin: int) -> list[Fraction]:
    """The schedule in exact rationals, from the closed form: linear to τ at step L, then the quadratic
    through (L, τ) with slope τ/L there and value 1 at step n, i.e. s(i) = τ + τ(i−L)/L + c(i−L)²."""
    q = n - lin
    c = (1 - tau - tau * q / lin) / q**2  # from s(n) = 1
    s = [i * tau / lin for i in range(lin)]
    s += [tau + tau * (i - lin) / lin + c * (i - lin) ** 2 for i in range(lin, n)]
    return [1 - x for x in [*s, Fraction(1)]]


def test_default_schedule_all_65_values():
    sigmas = linear_quadratic_schedule(64)
    assert len(sigmas) == 65
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    for got, printed in zip(sigmas, REFERENCE_64, strict=True):
        assert abs(got - printed) <= 5e-7
    exact = exact_schedule(64, Fraction(1, 40), 32)
    for got, want in zip(sigmas, exact, strict=True):
        assert abs(Fraction(got) - want) < Fraction(1, 10**14)


def test_matches_diffusers_helper_bit_for_bit():
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule as diffusers_schedule

    for n, tau in [(64, 0.025), (100, 0.025), (28, 0.025), (8, 0.1), (2, 0.025), (3, 0.5)]:
        # diffusers leaves the final 0 to its scheduler (diffusers-mochi.md §4.2).
        assert linear_quadratic_schedule(n, tau)[:-1] == diffusers_schedule(n, tau)


def test_fast_mode_schedule():
    sigmas = linear_quadratic_schedule(8, 0.1, linear_steps=6)
    want = [1, 0.98333, 0.96667, 0.95, 0.93333, 0.91667, 0.9, 0.66667, 0]
    assert sigmas == pytest.approx(want, abs=5e-6)
    exact = exact_schedule(8, Fraction(1, 10), 6)
    assert all(abs(Fraction(g) - w) < Fraction(1, 10**13) for g, w in zip(sigmas, exact, strict=True))


def test_one_step_does_not_divide_by_zero():
    assert linear_quadratic_schedule(1) == [1.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), "num_steps must be a positive integer, got 0"),
        (dict(num_steps=2.5), "num_steps must be a positive integer"),
        (dict(num_steps=10, threshold_noise=1.5), "threshold_noise must lie strictly between 0 and 1"),
        (dict(num_steps=10, linear_steps=10), "nearest valid: 9"),
        (dict(num_steps=10, linear_steps=0), "nearest valid: 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        linear_quadratic_schedule(**kwargs)


def test_custom_sigmas_validated():
    assert validate_sigmas((1, 0.5, 0)) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match=r"strictly decreasing, but sigma\[1\] = 0.5 and sigma\[2\] = 0.5"):
        validate_sigmas([1.0, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"sigma\[0\] = 1.2 is outside \[0, 1\]"):
        validate_sigmas([1.2, 0.0])
    with pytest.raises(ValueError, match="outside"):
        validate_sigmas([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least 2 values"):
        validate_sigmas([1.0])


def test_truncate_schedule():
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    assert truncate_schedule(sigmas, 0.6) == [0.6, 0.4, 0.2, 0.0]
    assert truncate_schedule(sigmas, 0.5) == [0.5, 0.4, 0.2, 0.0]
    assert truncate_schedule(sigmas, 1.0) == sigmas
    with pytest.raises(ValueError, match=r"start_sigma must lie in \(0.0, 1.0\]"):
        truncate_schedule(sigmas, 0.0)


@pytest.mark.parametrize(
    ("args", "nearest"),
    [((24, 0.9, None), "threshold_noise=0.676 or linear_steps=20"), ((80, 0.025, 1), "or linear_steps=2")],
)
def test_a_threshold_or_linear_steps_that_make_no_schedule_name_the_nearest_that_do(args, nearest):
    """A large threshold_noise (or few linear steps) makes the quadratic part rise past 1 − σ = 1 before it
    ends there; the error named the σ out of range and no valid choice."""
    with pytest.raises(ValueError, match=rf"does not fall steadily to 0; nearest valid: .*{nearest}$"):
        linear_quadratic_schedule(*args)


def test_the_nearest_valid_threshold_and_linear_steps_named_make_schedules():
    for n in (2, 3, 5, 24, 64, 101):
        for lin in {1, n // 2, n - 1} - {0, n}:
            for tau in (0.3, 0.6, 0.9, 0.99):
                try:
                    linear_quadratic_schedule(n, tau, lin)
                except ValueError as e:
                    found = re.search(r"threshold_noise=([\d.e-]+) or linear_steps=(\d+)$", str(e))
                    threshold, steps = float(found[1]), int(found[2])
                    assert threshold < tau and steps != lin
                    linear_quadratic_schedule(n, threshold, lin)
                    linear_quadratic_schedule(n, tau, steps)

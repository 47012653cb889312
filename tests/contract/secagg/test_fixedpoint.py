"""Fixed point: within one step of the clipped input, unbiased, and a full cohort's sum never wraps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge_contract.secagg.errors import ParameterError
from fedge_contract.secagg.fixedpoint import FixedPoint, Weighting
from fedge_contract.secagg.ring import Ring

values = hnp.arrays(np.float64, st.integers(1, 300), elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(values, st.sampled_from([16, 24, 32, 64]), st.integers(1, 1000), st.floats(0.01, 50), st.integers(0, 2**32))
def test_round_trip_within_one_step_of_the_clipped_value(x: np.ndarray, bits: int, summands: int, clip: float, seed: int) -> None:
    try:
        fixed = FixedPoint(Ring(bits), clip, summands)
    except ParameterError:
        return  # too many summands for the bits: refused, tested below
    encoded = fixed.encode(x, np.random.default_rng(seed))
    assert fixed.ring.contains(encoded)
    decoded = fixed.decode_sum(encoded, 1)
    assert np.all(np.abs(decoded - np.clip(x, -clip, clip)) <= fixed.step * (1 + 1e-9))


@pytest.mark.parametrize(("bits", "summands"), [(16, 100), (32, 100), (32, 20), (64, 10_000), (8, 3)])
def test_a_full_cohort_at_the_clip_sums_without_wrapping(bits: int, summands: int) -> None:
    fixed = FixedPoint(Ring(bits), 2.0, summands)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        one = fixed.encode(np.full(5, sign * 1e9), rng)  # beyond the clip: every device at +-limit
        total = fixed.ring.zeros(5)
        for _ in range(summands):
            total = fixed.ring.add(total, one)
        assert np.allclose(fixed.decode_sum(total, summands), sign * 2.0 * summands)


def test_stochastic_rounding_is_unbiased() -> None:
    """The mean of many encodes of x = (j + 0.3) steps converges to x; rounding to nearest would miss by 0.3 steps."""
    fixed = FixedPoint(Ring(16), 1.0, 100)  # a coarse step (1/327) makes the bias visible
    x = (np.arange(-50, 50) + 0.3) * fixed.step
    rng = np.random.default_rng(11)
    draws = 4000
    total = fixed.ring.zeros(x.size)
    for _ in range(draws // 40):  # sum 40 encodes at a time in the ring (40 <= 100 summands: no wrap)
        batch = fixed.ring.zeros(x.size)
        for _ in range(40):
            batch = fixed.ring.add(batch, fixed.encode(x, rng))
        total = total + fixed.decode_sum(batch, 40)
    mean = total / draws
    sigma = fixed.step / 2 / np.sqrt(draws)
    assert np.all(np.abs(mean - x) < 6 * sigma)


def test_the_default_choice_is_as_documented() -> None:
    """32 bits, 100 devices, clip 8: limit 21,474,836, step 3.7e-7 (DESIGN.md and the module docstring)."""
    fixed = FixedPoint(Ring(32), 8.0, 100)
    assert fixed.limit == 21_474_836
    assert fixed.step == pytest.approx(3.725e-7, rel=1e-3)


@pytest.mark.parametrize(("bits", "clip", "summands"), [(8, 1.0, 200), (16, 0.0, 2), (16, float("nan"), 2), (16, float("inf"), 2), (32, 1.0, 0)])
def test_impossible_encodings_are_refused(bits: int, clip: float, summands: int) -> None:
    with pytest.raises(ParameterError):
        FixedPoint(Ring(bits), clip, summands)


def test_non_finite_or_unflat_input_is_refused_and_too_many_summands_cannot_be_decoded() -> None:
    fixed = FixedPoint(Ring(32), 1.0, 4)
    with pytest.raises(ParameterError):
        fixed.encode(np.array([0.0, np.nan]), np.random.default_rng(0))
    with pytest.raises(ParameterError):
        fixed.encode(np.zeros((2, 2)), np.random.default_rng(0))
    with pytest.raises(ParameterError):
        fixed.decode_sum(fixed.ring.zeros(3), 5)


def test_weighting_gives_the_sample_weighted_mean() -> None:
    weighting = Weighting(clip=4.0, max_weight=1000)
    fixed = FixedPoint(Ring(32), 4.0, 3)
    rng = np.random.default_rng(2)
    deltas = [rng.normal(0, 0.5, 50) for _ in range(3)]
    samples = [10, 300, 77]
    total = fixed.ring.zeros(51)
    for delta, n in zip(deltas, samples, strict=True):
        total = fixed.ring.add(total, fixed.encode(weighting.vector(delta, n), rng))
    mean, weight = weighting.mean(fixed.decode_sum(total, 3))
    expected = sum(n * d for n, d in zip(samples, deltas, strict=True)) / sum(samples)
    assert weight == pytest.approx(sum(samples), rel=1e-6)
    assert np.allclose(mean, expected, atol=1e-4)
    with pytest.raises(ParameterError):
        weighting.vector(deltas[0], 0)

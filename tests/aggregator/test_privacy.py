"""Client-level DP: the noisy fixed-denominator mean and the RDP accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from aggregator.aggregation.privacy import NoisySum, PrivacyParams
from fedge_contract.tensors import ModelSpec

pytest.importorskip("opacus")


def _gaussian_epsilon_by_hand(sigma: float, steps: int, delta: float, orders: list[float]) -> float:
    """q = 1: the Gaussian mechanism's RDP is alpha / (2 sigma^2) per step (Mironov 2017, Prop. 7);
    converted with Balle et al. 2020 (Thm. 21): eps = rdp - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha)."""
    return min(
        steps * a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in orders
    )


def test_epsilon_without_sampling_matches_the_gaussian_mechanism_by_hand():
    from opacus.accountants.rdp import RDPAccountant

    params = PrivacyParams(noise_multiplier=2.0, clip_norm=1.0, sample_rate=1.0, delta=1e-5)
    for rounds in (1, 10, 30):
        expected = _gaussian_epsilon_by_hand(2.0, rounds, 1e-5, RDPAccountant.DEFAULT_ALPHAS)
        assert params.epsilon(rounds) == pytest.approx(expected, rel=1e-9)
    assert params.epsilon(0) == 0.0


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    base = PrivacyParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1)
    assert base.epsilon(1) < base.epsilon(10) < base.epsilon(100)
    assert PrivacyParams(noise_multiplier=2.0, clip_norm=1.0, sample_rate=0.1).epsilon(10) < base.epsilon(10)
    assert PrivacyParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.01).epsilon(10) < base.epsilon(10)


def test_noisy_sum_clips_each_update_ignores_sample_counts_and_divides_by_the_target():
    spec = ModelSpec.of({"w": np.zeros(2, np.float32)})
    params = PrivacyParams(noise_multiplier=1e-9, clip_norm=1.0)  # noise negligible: check the arithmetic
    noisy = NoisySum(spec, params, denominator=4, rng=np.random.default_rng(0))
    noisy.add({"w": np.array([3.0, 4.0], np.float32)}, 1000)  # clipped to (0.6, 0.8), weight ignored
    noisy.add({"w": np.array([0.5, 0.0], np.float32)}, 1)
    assert noisy.count == 2 and noisy.total_weight == 1001
    assert_allclose(noisy.mean()["w"], [(0.6 + 0.5) / 4, 0.8 / 4], rtol=1e-6)


def test_noise_has_the_calibrated_standard_deviation():
    spec = ModelSpec.of({"w": np.zeros(200_000, np.float32)})
    noisy = NoisySum(spec, PrivacyParams(noise_multiplier=1.5, clip_norm=2.0), denominator=10, rng=np.random.default_rng(1))
    noisy.add({"w": np.zeros(200_000, np.float32)}, 1)
    assert np.std(noisy.mean()["w"]) == pytest.approx(1.5 * 2.0 / 10, rel=0.01)


@pytest.mark.parametrize("kwargs", [{"noise_multiplier": 0.0}, {"clip_norm": 0.0}, {"sample_rate": 1.5}, {"delta": 1.0}])
def test_bad_parameters_are_refused(kwargs):
    settings = {"noise_multiplier": 1.0, "clip_norm": 1.0, **kwargs}
    with pytest.raises(ValueError):
        PrivacyParams(**settings)


def test_noisy_partial_sums_merge_before_the_noise() -> None:
    """Workers' clipped sums merge exactly; the noise is drawn once, by the coordinator."""
    spec = ModelSpec.of({"w": np.zeros(5, np.float32)})
    params = PrivacyParams(noise_multiplier=1.0, clip_norm=1.0)
    rng = np.random.default_rng(3)
    deltas = [{"w": rng.normal(0, 2, 5).astype(np.float32)} for _ in range(6)]
    single = NoisySum(spec, params, denominator=6, rng=np.random.default_rng(7))
    merged = NoisySum(spec, params, denominator=6, rng=np.random.default_rng(7))
    worker = NoisySum(spec, params, denominator=6, rng=np.random.default_rng(99))  # a worker's rng is never used
    for i, delta in enumerate(deltas):
        single.add(delta, 10 + i)
        (merged if i < 2 else worker).add(delta, 10 + i)
    merged.merge_wire(worker.to_wire())
    assert (merged.count, merged.total_weight) == (single.count, single.total_weight) == (6, sum(range(10, 16)))
    np.testing.assert_allclose(merged.mean()["w"], single.mean()["w"], rtol=1e-6)


def test_a_cohort_run_composes_each_rounds_own_sampling_rate():
    """With cohorts, epsilon composes the rounds' rates (a round before cohorts: the configured rate, a round
    that invited nobody: nothing), and the figure against an observer of the announcements is q = 1 over
    the most invitations of one device."""
    pytest.importorskip("opacus")
    from aggregator.aggregation.defence import Defence
    from aggregator.aggregation.privacy import epsilon_announced, epsilon_over_rounds
    from aggregator.config import config_of
    from aggregator.rounds.policy import Sampling

    defence = Defence(config_of("mqtt://127.0.0.1:1883", clip_norm="1.0", dp_noise=1.0, dp_population=100, target=10))
    figures = defence.metrics(4, Sampling({2: 0.3, 3: 0.0, 4: 0.2}, most_invitations=2))
    assert figures["dp_epsilon"] == pytest.approx(epsilon_over_rounds([0.1, 0.3, 0.2], 1.0, 1e-5))
    assert figures["dp_sampling_rate"] == 0.2 and figures["dp_epsilon_announced"] == pytest.approx(epsilon_announced(2, 1.0, 1e-5))
    assert defence.metrics(4)["dp_epsilon"] == pytest.approx(defence.privacy.epsilon(4))  # type: ignore[union-attr]

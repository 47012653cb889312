"""Whole protocol runs in memory: many devices, dropouts at every phase, too many dropouts, the fixed-point path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract.errors import Reason
from fedge_contract.secagg import Abandoned, Aggregate, DevicePolicy, ParameterError, Phase, Setup, Weighting
from fedge_contract.secagg.params import recommended
from tests.contract.secagg.relay import Dropouts, Relay, make_setup, random_inputs, ring_sum


def _run(setup: Setup, dropouts: Dropouts | None = None, **kw: Any) -> tuple[Relay, Aggregate | Abandoned]:
    relay = Relay(setup, random_inputs(setup), dropouts or Dropouts(), **kw)
    return relay, relay.run()


def _assert_exact_sum(relay: Relay, outcome: Aggregate | Abandoned) -> None:
    assert isinstance(outcome, Aggregate), outcome
    expected = relay.dropouts.expected_survivors(relay.setup.cohort)
    assert outcome.survivors == expected and outcome.count == len(expected)
    assert np.array_equal(outcome.total, ring_sum(relay.setup, relay.inputs, expected))


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_without_dropouts_the_server_gets_the_exact_sum(bits: int) -> None:
    relay, outcome = _run(make_setup(30, bits=bits))
    _assert_exact_sum(relay, outcome)
    assert relay.server.phase is Phase.DONE and relay.now == 0.0  # every phase ended as soon as all had answered


@pytest.mark.parametrize("early", [False, True])
def test_the_input_may_come_before_or_after_the_shares(early: bool) -> None:
    relay, outcome = _run(make_setup(12), submit_early=early)
    _assert_exact_sum(relay, outcome)


def test_a_small_cohort_runs_on_the_complete_graph() -> None:
    relay, outcome = _run(make_setup(6, degree=8, threshold=3, min_survivors=3))
    _assert_exact_sum(relay, outcome)
    assert relay.server._require_graph().effective_degree == 5


@pytest.mark.parametrize(
    "phase", ["before_keys", "after_keys", "after_shares", "after_masked", "during_unmask"],
)
@pytest.mark.parametrize("count", [1, 3])
def test_devices_lost_at_any_phase_leave_the_exact_sum_of_the_rest(phase: str, count: int) -> None:
    setup = make_setup(40, degree=10, threshold=6)
    lost = frozenset(setup.cohort[5 : 5 + count * 7 : 7])
    relay, outcome = _run(setup, Dropouts(**{phase: lost}))
    _assert_exact_sum(relay, outcome)
    assert relay.now > 0  # the phase waited for them until its deadline


def test_dropouts_at_every_phase_at_once() -> None:
    setup = make_setup(100, degree=20, threshold=11, length=64)
    c = setup.cohort
    dropouts = Dropouts(
        before_keys=frozenset(c[0:3]), after_keys=frozenset(c[10:13]), after_shares=frozenset(c[20:23]),
        after_masked=frozenset(c[30:33]), during_unmask=frozenset(c[40:43]),
    )
    relay, outcome = _run(setup, dropouts)
    _assert_exact_sum(relay, outcome)
    assert isinstance(outcome, Aggregate) and outcome.count == 91


@pytest.mark.parametrize(
    ("phase", "abandoned_in"),
    [
        ("before_keys", Phase.ADVERTISE), ("after_keys", Phase.SHARE), ("after_shares", Phase.MASK),
        ("after_masked", Phase.UNMASK), ("during_unmask", Phase.UNMASK),
    ],
)
def test_too_many_lost_abandons_the_session_with_a_reason_and_outputs_nothing(phase: str, abandoned_in: Phase) -> None:
    setup = make_setup(20, degree=8, threshold=5, min_survivors=12)
    relay, outcome = _run(setup, Dropouts(**{phase: frozenset(setup.cohort[:10])}))
    assert isinstance(outcome, Abandoned)
    assert outcome.phase is abandoned_in and outcome.reason is Reason.BELOW_THRESHOLD
    assert relay.server.phase is Phase.ABANDONED and relay.server._total is None
    assert outcome.detail  # says who or how many


@pytest.mark.parametrize(("phase", "abandoned_in"), [("after_shares", Phase.MASK), ("after_masked", Phase.UNMASK)])
def test_a_lost_neighbourhood_abandons_even_when_most_devices_survive(phase: str, abandoned_in: Phase) -> None:
    """Half of one device's neighbours lost: its secret can no longer be rebuilt, though 37 of 40 remain.

    Lost before their masked input, the server knows it when the mask phase ends and never asks for
    shares; lost after it, when the unmask phase ends without their answers.
    """
    setup = make_setup(40, degree=6, threshold=4, min_survivors=4)
    relay = Relay(setup, random_inputs(setup))
    while relay.server.phase is Phase.ADVERTISE:
        relay.step()
    victim = setup.cohort[0]
    lost = frozenset(sorted(relay.server._require_graph().neighbours(victim))[:3])  # 3 of its 6: 3 left < threshold 4
    relay.dropouts = Dropouts(**{phase: lost})
    outcome = relay.run()
    assert isinstance(outcome, Abandoned) and outcome.reason is Reason.BELOW_THRESHOLD
    assert outcome.phase is abandoned_in and victim in outcome.detail


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.data())
def test_random_dropouts_give_the_exact_sum_or_a_clean_abandon(data: st.DataObject) -> None:
    n = data.draw(st.integers(4, 14), label="n")
    degree = data.draw(st.sampled_from([2, 4, 6]), label="degree")
    threshold = data.draw(st.integers(2, min(degree, n - 1)), label="threshold")
    setup = make_setup(n, degree=degree, threshold=threshold, min_survivors=2, length=5)
    phases = ["before_keys", "after_keys", "after_shares", "after_masked", "during_unmask"]
    assignment = data.draw(st.lists(st.sampled_from([None, *phases]), min_size=n, max_size=n), label="dropouts")
    dropouts = Dropouts(**{p: frozenset(c for c, a in zip(setup.cohort, assignment, strict=True) if a == p) for p in phases})
    relay = Relay(setup, random_inputs(setup), dropouts, policy=DevicePolicy(min_threshold_fraction=0.0))
    outcome = relay.run()
    if isinstance(outcome, Abandoned):
        assert outcome.reason is Reason.BELOW_THRESHOLD
    else:
        # a survivor may have been pruned at the share phase for lack of sharing neighbours: the sum is of exactly U3
        assert set(outcome.survivors) <= set(dropouts.expected_survivors(setup.cohort))
        assert np.array_equal(outcome.total, ring_sum(setup, relay.inputs, outcome.survivors))


def test_fixed_point_deltas_come_back_as_their_weighted_mean() -> None:
    """The whole path a round will take: float deltas, Weighting, FixedPoint, the protocol, the mean."""
    setup = make_setup(25, degree=8, threshold=5, length=1 + 300, clip=2.0)
    fixed, weighting = setup.fixed_point, Weighting(clip=setup.clip, max_weight=500)
    rng = np.random.default_rng(4)
    deltas = {c: rng.normal(0, 0.3, 300) for c in setup.cohort}
    samples = {c: int(rng.integers(10, 400)) for c in setup.cohort}
    inputs = {c: fixed.encode(weighting.vector(deltas[c], samples[c]), rng) for c in setup.cohort}
    dropouts = Dropouts(after_shares=frozenset(setup.cohort[:2]), after_masked=frozenset(setup.cohort[2:4]))
    outcome = Relay(setup, inputs, dropouts).run()
    assert isinstance(outcome, Aggregate) and outcome.count == 23
    mean, weight = weighting.mean(fixed.decode_sum(outcome.total, outcome.count))
    survivors = outcome.survivors
    expected = sum(samples[c] * np.clip(deltas[c], -2, 2) for c in survivors) / sum(samples[c] for c in survivors)
    assert weight == pytest.approx(sum(samples[c] for c in survivors), rel=1e-6)
    assert np.max(np.abs(mean - expected)) < 1e-5


@pytest.mark.parametrize("n", [20, 100])
def test_the_recommended_parameters_survive_30_percent_lost_mid_protocol(n: int) -> None:
    """The issue's worst case: 30% of the cohort gone after the shares went out, half before masking, half after."""
    rec = recommended(n)
    setup = make_setup(n, degree=rec.degree, threshold=rec.threshold, min_survivors=rec.min_survivors, length=4)
    lost = list(np.random.default_rng(n).permutation(setup.cohort)[: round(0.3 * n)])
    half = len(lost) // 2
    dropouts = Dropouts(after_shares=frozenset(lost[:half]), after_masked=frozenset(lost[half:]))
    relay, outcome = _run(setup, dropouts)
    _assert_exact_sum(relay, outcome)


def test_recommended_parameters_make_valid_setups() -> None:
    for n in [3, 4, 5, 7, 10, 20, 33, 64, 100, 257, 1000]:
        rec = recommended(n)
        setup = make_setup(n, degree=rec.degree, threshold=rec.threshold, min_survivors=rec.min_survivors)
        neighbours = min(setup.degree, n - 1)
        assert DevicePolicy().min_threshold_fraction * neighbours <= setup.threshold <= neighbours  # a default device accepts it
    with pytest.raises(ParameterError):
        recommended(2)

"""Cohort selection (aggregator/rounds/cohort.py): reproducible, fair over time, eligible devices first,
extensions invite only new devices, state survives a restart, an honest sampling rate."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.rounds.cohort import Candidate, CohortPolicy, CohortSelector, candidates, extension_size
from fedge_contract import Presence

FLEET = [Candidate(f"agent-{i}") for i in range(1000)]


def _run(selector: CohortSelector, devices: list[Candidate], rounds: range) -> list[frozenset[str]]:
    return [selector.select(r, devices).invited for r in rounds]


def test_the_same_seed_and_inputs_give_the_same_cohorts_in_any_order():
    policy = CohortPolicy(target=20, seed=7)
    shuffled = FLEET[:]
    random.Random(1).shuffle(shuffled)
    first = _run(CohortSelector(policy), FLEET, range(1, 21))
    assert first == _run(CohortSelector(policy), shuffled, range(1, 21))
    assert first != _run(CohortSelector(CohortPolicy(target=20, seed=8)), FLEET, range(1, 21))
    assert all(len(c) == policy.size == 26 for c in first)
    selector = CohortSelector(policy)
    assert selector.select(1, FLEET) is selector.select(1, FLEET[:500])  # a round's cohort is fixed once drawn


def test_participation_is_spread_more_evenly_than_uniform_sampling():
    """1000 devices, 26 invited per round, 300 rounds: uniform sampling's counts have a standard
    deviation of sqrt(300 x 0.026 x 0.974) = 2.76; favouring devices left out keeps it well below."""
    counts = dict.fromkeys((c.client_id for c in FLEET), 0)
    for cohort in _run(CohortSelector(CohortPolicy(target=20, seed=0)), FLEET, range(1, 301)):
        for client in cohort:
            counts[client] += 1
    spread = statistics.pstdev(counts.values())
    assert statistics.mean(counts.values()) == pytest.approx(7.8)
    assert spread < 0.7 * math.sqrt(300 * 0.026 * 0.974)
    assert min(counts.values()) >= 3  # nobody is left out for long


def test_a_device_invited_last_round_is_less_likely_to_be_invited_again():
    selector = CohortSelector(CohortPolicy(target=20, seed=3))
    again = 0
    previous = selector.select(1, FLEET).invited
    for r in range(2, 202):
        cohort = selector.select(r, FLEET).invited
        again += len(cohort & previous)
        previous = cohort
    assert again / (200 * 26) < 0.5 * 26 / 1000  # uniform sampling would re-invite 2.6%


@settings(max_examples=60, deadline=None)
@given(flags=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=120), target=st.integers(1, 40), seed=st.integers(0, 3))
def test_eligible_devices_first_then_ineligible_online_ones_then_offline_ones(flags, target, seed):
    devices = [Candidate(f"d{i}", online, eligible) for i, (online, eligible) in enumerate(flags)]
    policy = CohortPolicy(target=target, seed=seed)
    cohort = CohortSelector(policy).select(1, devices).invited
    ready = {d.client_id for d in devices if d.online and d.eligible}
    online = {d.client_id for d in devices if d.online}
    assert len(cohort) == min(policy.size, len(devices))
    if len(ready) >= policy.size:
        assert cohort <= ready
    elif len(online) >= policy.size:
        assert ready <= cohort <= online  # an offline device only fills in a fleet no larger than the cohort
    else:
        assert online <= cohort


def test_extension_invites_only_new_eligible_devices_and_replays_the_same():
    policy = CohortPolicy(target=20, seed=2)

    def extended() -> tuple[frozenset[str], frozenset[str]]:
        selector = CohortSelector(policy)
        first = selector.select(5, FLEET).invited
        dropped = set(sorted(first)[:6])  # six invited devices went offline
        now = [Candidate(c.client_id, c.client_id not in dropped) for c in FLEET]
        return first, selector.extend(5, now, 8).invited

    first, after = extended()
    assert first < after and len(after - first) == 8
    assert after == extended()[1]
    with pytest.raises(ValueError):
        CohortSelector(policy).extend(5, FLEET, 3)  # nothing selected yet


def test_extension_follows_the_first_draws_order():
    """Over an unchanged pool an extension invites exactly the devices a larger first draw would have."""
    small = CohortSelector(CohortPolicy(target=20, seed=4))
    small.select(1, FLEET)
    grown = small.extend(1, FLEET, 13).invited
    assert grown == CohortSelector(CohortPolicy(target=20, over_select=1.95, seed=4)).select(1, FLEET).invited


def test_state_survives_a_restart_through_json():
    policy = CohortPolicy(target=20, seed=9)
    straight = CohortSelector(policy)
    expected = _run(straight, FLEET, range(1, 31))
    restarted = CohortSelector(policy)
    got = _run(restarted, FLEET, range(1, 16))
    restarted = CohortSelector.from_state(policy, json.loads(json.dumps(restarted.to_state())))
    assert restarted.select(15, FLEET[:100]).invited == got[-1]  # the open round is re-announced as it was
    got += _run(restarted, FLEET, range(16, 31))
    assert got == expected
    assert restarted.to_state() == straight.to_state()
    with pytest.raises(ValueError, match="seed"):
        CohortSelector.from_state(CohortPolicy(target=20, seed=1), straight.to_state())


def test_sampling_rate_bounds_the_real_inclusion_probability():
    """Monte Carlo over seeds, with a history that makes weights unequal: the bound holds for the
    device most often invited, and is m/n-like when weights are equal."""
    devices = [Candidate(f"d{i}") for i in range(40)]
    hits: dict[str, int] = dict.fromkeys((d.client_id for d in devices), 0)
    rate = 0.0
    trials = 3000
    for seed in range(trials):
        selector = CohortSelector(CohortPolicy(target=4, over_select=1.0, seed=seed))
        selector.last_invited = {f"d{i}": 10 - (i % 4) for i in range(40)}  # ages 1-4
        selection = selector.select(11, devices)
        rate = selection.sampling_rate
        for client in selection.invited:
            hits[client] += 1
    worst = max(hits.values()) / trials
    assert worst <= rate + 3 * math.sqrt(rate * (1 - rate) / trials)
    fresh = CohortSelector(CohortPolicy(target=20, seed=0)).select(1, FLEET)
    assert 26 / 1000 <= fresh.sampling_rate < 1.05 * 26 / 1000


def test_announcement_encodes_exactly_the_invited_set():
    selector = CohortSelector(CohortPolicy(target=200, seed=0))
    devices = [Candidate(f"agent-{i}") for i in range(10_000)]
    selection = selector.select(1, devices)
    cohort = selection.announcement("f", population=len(devices))
    assert cohort.invited is not None and cohort.invited.count == 260 and len(cohort.invited.data) < 760
    found = {d.client_id for d in devices if cohort.invites(d.client_id, fleet="f", round_no=1)}
    assert selection.invited <= found and len(found - selection.invited) <= 2


def test_candidates_from_presence_and_extension_size():
    devices = {
        "a": Presence("f", "a", "online", eligible=True),
        "b": Presence("f", "b", "online", eligible=False),
        "c": Presence("f", "c", "offline"),
        "d": Presence("f", "d", "online"),  # an agent that does not report eligibility
    }
    assert candidates(devices) == [Candidate("a", True, True), Candidate("b", True, False), Candidate("c", False, True), Candidate("d", True, True)]
    policy = CohortPolicy(target=200)
    assert extension_size(policy, accepted=150, outstanding=20) == 45  # 50 missing x 1.3 = 65 wanted, 20 still out
    assert extension_size(policy, accepted=150, outstanding=80) == 0
    assert extension_size(policy, accepted=200, outstanding=0) == 0
    with pytest.raises(ValueError):
        CohortPolicy(target=0)


def test_privacy_accounting_from_the_selections_rates():
    pytest.importorskip("opacus")
    from aggregator.aggregation.privacy import PrivacyParams, epsilon_announced, epsilon_over_rounds

    selector = CohortSelector(CohortPolicy(target=200, seed=0))
    devices = [Candidate(f"agent-{i}") for i in range(10_000)]
    rates = [selector.select(r, devices).sampling_rate for r in range(1, 9)]
    assert all(0.026 <= q < 0.2 for q in rates) and list(selector.rates.values()) == rates and rates[-1] > rates[0]
    uniform = PrivacyParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=rates[0]).epsilon(8)
    assert epsilon_over_rounds([rates[0]] * 8, 1.0, 1e-5) == pytest.approx(uniform)
    assert epsilon_over_rounds(rates, 1.0, 1e-5) >= uniform  # later rounds favour devices left out: larger q
    announced = epsilon_announced(selector.max_invitations(), 1.0, 1e-5)
    assert announced == pytest.approx(PrivacyParams(noise_multiplier=1.0, clip_norm=1.0).epsilon(selector.max_invitations()))
    assert epsilon_over_rounds([], 1.0, 1e-5) == 0.0
    with pytest.raises(ValueError):
        epsilon_over_rounds([0.0], 1.0, 1e-5)

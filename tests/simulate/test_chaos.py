"""The chaos plan of ``fedge simulate``: seeded, validated, and what the flags promise."""

from __future__ import annotations

import math

import pytest

from fedge.netem import PROFILES
from fedge.simulate.chaos import ChaosOptions, late_ids, plan_dropouts

IDS = [f"agent-{i}" for i in range(100)]


def test_dropouts_are_seeded_and_split_between_training_upload_and_never_coming_back():
    options = ChaosOptions(dropout=0.1, dropout_return=7)
    faults = plan_dropouts(IDS, options, rounds=20, seed=3)
    assert [str(f) for f in faults] == [str(f) for f in plan_dropouts(IDS, options, rounds=20, seed=3)]
    assert [str(f) for f in faults] != [str(f) for f in plan_dropouts(IDS, options, rounds=20, seed=4)]
    assert len({f.link for f in faults}) == 10
    assert sum(f.on_upload for f in faults) == 5  # half vanish mid-upload, half at the start of training
    assert sorted(f.seconds for f in faults).count(math.inf) == 4 and all(f.seconds in (7, math.inf) for f in faults)
    assert all(1 <= f.at_round <= 19 for f in faults)


def test_late_joiners_are_seeded():
    options = ChaosOptions(late_joiners=0.05)
    assert late_ids(IDS, options, seed=1) == late_ids(IDS, options, seed=1)
    assert len(late_ids(IDS, options, seed=1)) == 5


def test_knobs_override_the_profile_and_decide_whether_a_proxy_is_needed():
    assert not ChaosOptions().active
    assert ChaosOptions(kill_aggregator_round=2).active and not ChaosOptions(kill_aggregator_round=2).needs_proxy
    assert ChaosOptions(double_fault_round=2).active and ChaosOptions(fill_store_round=2).active
    tuned = ChaosOptions(network="cellular", reset_prob=0.1)
    assert tuned.needs_proxy
    assert tuned.profile().latency_ms == PROFILES["cellular"].latency_ms and tuned.profile().reset_prob == 0.1


@pytest.mark.parametrize(
    "options, error",
    [
        (ChaosOptions(network="dialup"), "unknown --network"),
        (ChaosOptions(reset_prob=1.5), "reset_prob"),
        (ChaosOptions(faults="agent-1@x"), "bad fault"),
        (ChaosOptions(dropout=2), "--dropout"),
        (ChaosOptions(late_joiners=0.1, late_join_round=9), "--late-join-round"),
        (ChaosOptions(kill_aggregator_round=0), "--kill-aggregator-at"),
        (ChaosOptions(restart_broker_round=6), "--restart-broker-at"),
        (ChaosOptions(double_fault_round=0), "--double-fault-at"),
        (ChaosOptions(fill_store_round=6), "--fill-store-at"),
    ],
)
def test_bad_options_are_refused_with_the_flag_named(options, error):
    with pytest.raises(ValueError, match=error):
        options.validate(agents=10, rounds=5)

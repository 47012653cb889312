"""When devices' presence asks for a keyframe (aggregator/broadcasting/failures.py)."""

from __future__ import annotations

from aggregator.broadcasting.failures import CatchUpFailures, is_catch_up_failure
from fedge_contract import Presence

FLEET = "f"


def presence(client: str, why_not: str = "", state: str = "online") -> Presence:
    return Presence(FLEET, client, state, "test", eligible=not why_not, why_not=why_not)


HASH = "hash_mismatch: keyframe v3 does not decode to the model its hash names"
SILENT = "incomplete: catch-up to v9: no message for 120s (waiting for fl/f/global/delta/8)"


def test_which_reasons_count() -> None:
    assert is_catch_up_failure(presence("a", HASH)) and is_catch_up_failure(presence("a", SILENT))
    assert is_catch_up_failure(presence("a", "bad_tensor: zstd frame is corrupt"))
    assert not is_catch_up_failure(presence("a", "fingerprint: v3 is for architecture 1234"))  # a keyframe cannot heal that
    assert not is_catch_up_failure(presence("a", "on battery (31%)"))  # the device's own conditions
    assert not is_catch_up_failure(presence("a", HASH, state="offline")) and not is_catch_up_failure(None)


def test_two_devices_ask_for_one_keyframe_and_the_count_restarts_after_it() -> None:
    failures = CatchUpFailures()
    assert not failures.on_presence("a", presence("a", HASH), online=20)  # one device may be its own trouble
    assert not failures.on_presence("a", presence("a", HASH), online=20)  # the same device again is still one
    assert failures.on_presence("b", presence("b", SILENT), online=20)  # two: a keyframe
    assert not failures.on_presence("c", presence("c", HASH), online=20)  # requested already: not twice
    failures.keyframe_taken()
    assert failures.failing == set()
    assert not failures.on_presence("a", presence("a", HASH), online=20)
    assert not failures.on_presence("a", presence("a"), online=20)  # it caught up: no longer counts
    assert not failures.on_presence("b", presence("b", HASH), online=20)
    assert failures.failing == {"b"}


def test_the_threshold_grows_with_the_fleet_and_a_fleet_of_one_heals() -> None:
    failures = CatchUpFailures()
    assert [failures.threshold(n) for n in (1, 2, 20, 200, 1000)] == [1, 2, 2, 2, 10]
    assert CatchUpFailures().on_presence("only", presence("only", HASH), online=1)
    many = CatchUpFailures()
    assert not any(many.on_presence(f"d{i}", presence(f"d{i}", HASH), online=1000) for i in range(9))
    assert many.on_presence("d9", presence("d9", HASH), online=1000)

"""The Broadcaster's state without a broker: what the store keeps, what it refuses, what it writes per version."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.broadcasting.broadcaster import Broadcaster
from aggregator.store import BroadcastState
from aggregator.store import broadcast as broadcast_store
from aggregator.store.records import item_bytes
from fedge_contract import DecodeError, Reason, Topics
from fedge_contract.broadcast import BroadcastPolicy
from tests.contract.broadcast.helpers import FLEET, SPEC, initial, same_bits, walk

TOPICS = Topics(FLEET)
POLICY = BroadcastPolicy(chain="flat+topk:0.3+q8+zstd", every=3, ratio=None)


def broadcaster(versions: int, policy: BroadcastPolicy = POLICY) -> Broadcaster:
    """A broadcaster stepped through ``versions`` versions, never published (no connection needed for that)."""
    rng, true = np.random.default_rng(0), initial()
    out = Broadcaster(None, TOPICS, SPEC, policy)
    out.begin(true, 0, devices_hold=True)
    for version in range(1, versions + 1):
        true = walk(true, rng)
        out.advance(true, version)
    return out


def resumed(state: BroadcastState, policy: BroadcastPolicy = POLICY) -> Broadcaster:
    return Broadcaster.from_state(None, TOPICS, SPEC, policy, state)


@pytest.mark.parametrize("versions", [0, 1, 2, 3, 5])  # a hold, deltas, a snapshot keyframe (3), deltas after it
def test_state_round_trips_through_the_store(tmp_path: Path, versions: int) -> None:
    original = broadcaster(versions)
    db = sqlite3.connect(tmp_path / "store.sqlite")
    broadcast_store.create(db)
    with db:
        broadcast_store.save(db, original.state())
    state = broadcast_store.load(db, versions)
    assert state is not None and broadcast_store.load(db, versions + 1) is None
    again = resumed(state)
    assert again.version == versions and again.held_hash == original.held_hash and same_bits(dict(again.held), dict(original.held))
    assert again.encoder.keyframe == original.encoder.keyframe and again.encoder.retained == original.encoder.retained
    assert again.encoder.latest == original.encoder.latest  # the same bytes are re-announced, never re-encoded
    assert again.state() == original.state()


def test_a_version_writes_its_new_delta_not_the_whole_state(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "store.sqlite")
    broadcast_store.create(db)
    rng, true = np.random.default_rng(0), initial()
    caster = Broadcaster(None, TOPICS, SPEC, BroadcastPolicy(chain="flat+topk:0.3+q8+zstd", every=30, ratio=None))
    caster.begin(true, 0, devices_hold=True)
    with db:
        first = broadcast_store.save(db, caster.state())
    written = []
    for version in range(1, 5):
        true = walk(true, rng)
        step = caster.advance(true, version)
        with db:
            written.append(broadcast_store.save(db, caster.state()))
        assert written[-1] == len(item_bytes(caster.state().items[f"delta/{version}"])) and step.broadcast.nbytes < written[-1]
    assert first > max(written)  # the keyframe once, then one delta per version
    caster.request_keyframe()
    true = walk(true, rng)
    caster.advance(true, 5)
    with db:
        broadcast_store.save(db, caster.state())
    keys = sorted(key for (key,) in db.execute("SELECT key FROM broadcast_items"))
    assert keys == ["keyframe/5", "latest/5"]  # the retired deltas and the old keyframe are gone


def test_a_keyframe_lists_the_topics_it_makes_obsolete_in_the_state() -> None:
    caster = broadcaster(2)
    caster._chunk_sets[TOPICS.keyframe_chunks(0)] = 2  # as if the keyframe of v0 had gone out in two chunks
    true = walk(initial(), np.random.default_rng(1))
    step = caster.advance(true, 3)  # every=3: a snapshot keyframe, deltas 1 and 2 retired
    assert step.keyframe is not None and step.retire == (1, 2)
    stale = msgpack.unpackb(caster.state().header, raw=False)["stale"]
    assert stale == [TOPICS.keyframe_chunks(0) + "/0", TOPICS.keyframe_chunks(0) + "/1", TOPICS.keyframe_chunks(0) + "/2",
                     TOPICS.global_delta(1), TOPICS.global_delta(2)]
    assert resumed(caster.state())._stale == stale  # a restart between the commit and the publish still clears them


def _broken(state: BroadcastState, *, header: dict[str, Any] | None = None, items: dict[str, bytes] | None = None) -> BroadcastState:
    head = msgpack.unpackb(state.header, raw=False)
    return BroadcastState(state.version, msgpack.packb({**head, **(header or {})}, use_bin_type=True), {**state.items, **(items or {})})


def test_broken_state_is_refused_with_a_reason() -> None:
    state = broadcaster(2).state()
    other = BroadcastPolicy(chain="flat+q4+zstd")
    assert resumed(state, other).policy == other  # a new policy applies from the next version
    missing = BroadcastState(state.version, state.header, {k: v for k, v in state.items.items() if k != "delta/1"})
    delta1 = msgpack.unpackb(item_bytes(state.items["delta/1"]), raw=False)
    cases = [
        (_broken(state, header={"format": 2}), Reason.SCHEMA),
        (_broken(state, header={"fingerprint": "0" * 16}), Reason.FINGERPRINT),
        (missing, Reason.INCOMPLETE),
        (_broken(state, items={"delta/1": b"\xc1"}), Reason.MALFORMED),
        (_broken(state, items={"delta/1": msgpack.packb({**delta1, "held_hash": b"\0" * 16})}), Reason.HASH_MISMATCH),
        (_broken(state, header={"held_hash": b"\0" * 16}), Reason.BAD_VALUE),
        (_broken(state, header={"stale": ["fl/other/global/delta/1"]}), Reason.BAD_VALUE),  # never clear another fleet's topics
        (_broken(state, header={"chunk_sets": {TOPICS.global_chunks(1): -1}}), Reason.BAD_VALUE),
    ]
    for broken, reason in cases:
        with pytest.raises(DecodeError) as caught:
            resumed(broken)
        assert caught.value.reason is reason, reason


def test_load_from_a_store_that_predates_delta_broadcasts(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite")
    assert broadcast_store.load(db, 0) is None

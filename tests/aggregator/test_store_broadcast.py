"""The store keeps the delta broadcaster's state with the checkpoint of its version, and what each device downloaded per round."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from aggregator.broadcasting.broadcaster import Broadcaster
from aggregator.store import BroadcastState, Store
from aggregator.store.records import item_bytes
from fedge_contract import Topics
from fedge_contract.broadcast import BroadcastPolicy
from tests.contract.broadcast.helpers import FLEET, SPEC, initial, walk

POLICY = BroadcastPolicy(chain="flat+topk:0.3+q8+zstd", every=30, ratio=None)


def begun() -> tuple[np.random.Generator, dict[str, np.ndarray], Broadcaster]:
    """A seeded walk, its version 0, and a broadcaster begun there (a hold), never connected."""
    rng, true = np.random.default_rng(0), initial()
    caster = Broadcaster(None, Topics(FLEET), SPEC, POLICY)
    caster.begin(true, 0, devices_hold=True)
    return rng, true, caster


def test_the_state_commits_with_the_checkpoint_of_its_version(tmp_path: Path) -> None:
    path = tmp_path / "agg.sqlite"
    rng, true, caster = begun()
    with Store(path) as store:
        store.save_initial(SPEC.fingerprint, true, caster.state())
        assert store.broadcast_state(0) == BroadcastState(0, caster.state().header, {k: item_bytes(v) for k, v in caster.state().items.items()})
        store.open_round(1, 0, None)
        true = walk(true, rng)
        caster.advance(true, 1)
        store.close_round(1, 1, SPEC.fingerprint, true, {}, 3, {"accuracy": 0.5}, caster.state())
    with Store(path, readonly=True) as store:
        state = store.broadcast_state(1)
        assert state is not None and store.broadcast_state(0) is None  # only the checkpoint's version
        again = Broadcaster.from_state(None, Topics(FLEET), SPEC, POLICY, state)
        assert again.held_hash == caster.held_hash and again.encoder.latest == caster.encoder.latest


def test_a_failed_checkpoint_leaves_the_previous_state(tmp_path: Path) -> None:
    """One transaction: a close that fails (here: the version's checkpoint exists already) writes no broadcast state."""
    path = tmp_path / "agg.sqlite"
    rng, true, caster = begun()
    with Store(path) as store:
        store.save_initial(SPEC.fingerprint, true, caster.state())
        store.open_round(1, 0, None)
        caster.advance(walk(true, rng), 1)
        with pytest.raises(sqlite3.IntegrityError):
            store.close_round(1, 0, SPEC.fingerprint, true, {}, 3, {}, caster.state())  # version 0 again
        assert store.broadcast_state(0) is not None and store.broadcast_state(1) is None


def test_save_broadcast_alone_and_no_state_before_delta_broadcasts(tmp_path: Path) -> None:
    true = initial()
    with Store(tmp_path / "agg.sqlite") as store:
        store.save_initial(SPEC.fingerprint, true)  # an aggregator without delta broadcasts
        assert store.broadcast_state(0) is None
        caster = Broadcaster(None, Topics(FLEET), SPEC, POLICY)
        caster.begin(true, 0, devices_hold=False)
        store.save_broadcast(caster.state())
        state = store.broadcast_state(0)
        assert state is not None and state.header == caster.state().header


def test_bytes_down_per_round_and_an_old_read_only_store(tmp_path: Path) -> None:
    path = tmp_path / "agg.sqlite"
    with Store(path) as store:
        store.open_round(1, 0, None)
        store.add_bytes_down(1, 318)
        store.add_bytes_down(1, 318)  # a re-announcement: every device downloads it again
        store.add_bytes_down(7, 5)  # a round that was never opened: nothing to count
        store.record_receipts([(1.0, 1, "a", "u1", "accepted", "", 500), (2.0, 1, "b", "u2", "stale", "x", 300)])
        assert [r["bytes_down"] for r in store.rounds()] == [636]
        assert store.receipts_by_round() == {1: 2} and store.bytes_by_round() == {1: 800}
    old = tmp_path / "old.sqlite"  # a store written before the column, read by `fedge report`
    db = sqlite3.connect(old)
    db.executescript("CREATE TABLE rounds (round INTEGER PRIMARY KEY, base_version INTEGER NOT NULL, opened REAL NOT NULL, "
                     "deadline REAL, closed REAL, accepted INTEGER NOT NULL DEFAULT 0, extensions INTEGER NOT NULL DEFAULT 0, "
                     "metrics TEXT NOT NULL DEFAULT '{}');")
    db.execute("INSERT INTO rounds (round, base_version, opened, metrics) VALUES (1, 0, 1.0, ?)", (json.dumps({"accuracy": 0.5}),))
    db.commit()
    db.close()
    with Store(old, readonly=True) as store:
        assert store.rounds()[0]["bytes_down"] == 0 and store.broadcast_state(0) is None

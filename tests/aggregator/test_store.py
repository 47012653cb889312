"""The aggregator's SQLite store: checkpoints, spool, rounds, receipts, identity; survives reopening."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import ReceiptRow, SpooledUpdate, Store

W0 = {"fc.weight": np.array([[0.5, -0.25], [1.0, 2.0]], np.float32), "fc.bias": np.array([0.125, -8.0], np.float32)}
W1 = {"fc.weight": np.array([[1.5, 0.75], [0.0, -2.0]], np.float32), "fc.bias": np.array([3.0, 4.0], np.float32)}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "agg.sqlite"  # a parent folder that does not exist yet


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    with Store(path) as opened:
        yield opened


def assert_weights_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == np.float32
        np.testing.assert_array_equal(actual[name], expected[name])


def spool(store: Store, update_id: str, client: str, round_no: int = 1, payload: bytes = b"payload") -> None:
    store.spool(
        update_id=update_id, client_id=client, round_no=round_no, base_version=round_no - 1, num_samples=10, payload=payload
    )


def test_empty_store_has_no_checkpoint(store: Store) -> None:
    assert store.latest_checkpoint() is None
    assert store.rounds() == [] and store.receipts() == []


def test_initial_checkpoint(store: Store) -> None:
    store.save_initial("fp0", W0)
    checkpoint = store.latest_checkpoint()
    assert checkpoint is not None
    assert (checkpoint.version, checkpoint.fingerprint) == (0, "fp0")
    assert_weights_equal(checkpoint.weights, W0)
    assert checkpoint.strategy_state == {}


def test_initial_checkpoint_only_once(store: Store) -> None:
    store.save_initial("fp0", W0)
    with pytest.raises(sqlite3.IntegrityError):
        store.save_initial("fp0", W1)
    assert_weights_equal(store.latest_checkpoint().weights, W0)  # type: ignore[union-attr]


def test_spool_and_is_accepted(store: Store) -> None:
    store.open_round(1, 0, 100.0)
    spool(store, "u1", "agent-1", payload=b"one")
    spool(store, "u2", "agent-2", payload=b"two")
    spool(store, "u9", "agent-9", round_no=2, payload=b"other round")
    assert store.is_accepted("u1") and store.is_accepted("u9")
    assert not store.is_accepted("u3")
    assert sorted(store.spooled(1), key=lambda s: s.update_id) == [
        SpooledUpdate("u1", "agent-1", 10, b"one"),
        SpooledUpdate("u2", "agent-2", 10, b"two"),
    ]
    assert sorted(store.accepted_ids(1)) == ["u1", "u2"]
    assert store.accepted_ids(2) == ["u9"]


def test_duplicate_update_id_is_an_integrity_error_and_rolls_back(store: Store) -> None:
    spool(store, "u1", "agent-1", payload=b"first")
    with pytest.raises(sqlite3.IntegrityError):
        spool(store, "u1", "agent-2", payload=b"second")
    assert store.spooled(1) == [SpooledUpdate("u1", "agent-1", 10, b"first")]
    spool(store, "u2", "agent-2")  # no transaction left dangling
    assert sorted(store.accepted_ids(1)) == ["u1", "u2"]


def test_close_round_stores_the_version_and_releases_the_spool(store: Store) -> None:
    store.save_initial("fp", W0)
    store.open_round(1, 0, 100.0)
    spool(store, "u1", "agent-1")
    spool(store, "u2", "agent-2")
    store.close_round(1, 1, "fp", W1, {"momentum": np.array([1.0, 2.0], np.float32)}, accepted=2)

    checkpoint = store.latest_checkpoint()
    assert checkpoint is not None and checkpoint.version == 1
    assert_weights_equal(checkpoint.weights, W1)
    assert_weights_equal(checkpoint.strategy_state, {"momentum": np.array([1.0, 2.0], np.float32)})
    assert store.spooled(1) == []
    assert sorted(store.accepted_ids(1)) == ["u1", "u2"]  # still known: later resends are duplicates
    assert store.is_accepted("u1")
    (row,) = store.rounds()
    assert row["accepted"] == 2 and row["closed"] is not None


def test_close_round_is_atomic(store: Store) -> None:
    """If the checkpoint cannot be written, the round stays open and its spool stays."""
    store.save_initial("fp", W0)
    store.open_round(1, 0, 100.0)
    spool(store, "u1", "agent-1")
    with pytest.raises(sqlite3.IntegrityError):
        store.close_round(1, 0, "fp", W1, {}, accepted=1)  # version 0 exists already
    assert [s.update_id for s in store.spooled(1)] == ["u1"]
    assert store.rounds()[0]["closed"] is None
    assert_weights_equal(store.latest_checkpoint().weights, W0)  # type: ignore[union-attr]


def test_latest_checkpoint_is_the_highest_version(store: Store) -> None:
    store.save_initial("fp", W0)
    store.close_round(1, 1, "fp", W1, {}, accepted=1)
    store.close_round(2, 2, "fp", W0, {}, accepted=1)
    checkpoint = store.latest_checkpoint()
    assert checkpoint is not None and checkpoint.version == 2
    assert_weights_equal(checkpoint.weights, W0)


def test_reopen_gives_the_same_state(path: Path) -> None:
    with Store(path) as store:
        store.claim("fleet", "lab")
        store.save_initial("fp", W0)
        store.open_round(1, 0, 100.0)
        spool(store, "u1", "agent-1")
        store.close_round(1, 1, "fp", W1, {}, accepted=1)
        store.open_round(2, 1, 200.0)
        spool(store, "u2", "agent-2", round_no=2, payload=b"open round")
    with Store(path) as store:
        checkpoint = store.latest_checkpoint()
        assert checkpoint is not None and (checkpoint.version, checkpoint.fingerprint) == (1, "fp")
        assert_weights_equal(checkpoint.weights, W1)
        assert store.spooled(2) == [SpooledUpdate("u2", "agent-2", 10, b"open round")]
        assert store.is_accepted("u1")
        assert store.claim("fleet", "other") == "lab"
        assert [r["round"] for r in store.rounds()] == [1, 2]


def test_claim(store: Store) -> None:
    assert store.claim("fleet", "lab") is None  # first claim records it
    assert store.claim("fleet", "lab") is None  # same value: fine
    assert store.claim("fleet", "other") == "lab"  # different: the previous value comes back
    assert store.claim("fleet", "lab") is None  # and it was not overwritten
    assert store.claim("fingerprint", "abc") is None  # keys are independent


def test_rounds_round_trip(store: Store) -> None:
    store.open_round(1, 0, 100.0)
    opened = store.rounds()[0]["opened"]
    store.open_round(1, 0, 150.0)  # re-opening (restart) keeps the first opening time
    store.extend_round(1, 210.0)
    store.set_round_metrics(1, {"accuracy": 0.9375, "loss": 0.25, "seconds": 3.5})
    store.open_round(2, 1, None)
    rounds = store.rounds()
    assert rounds[0]["opened"] == opened
    assert {k: rounds[0][k] for k in ("round", "base_version", "deadline", "closed", "accepted", "extensions", "metrics")} == {
        "round": 1, "base_version": 0, "deadline": 210.0, "closed": None, "accepted": 0, "extensions": 1,
        "metrics": {"accuracy": 0.9375, "loss": 0.25, "seconds": 3.5},
    }
    assert rounds[1]["round"] == 2 and rounds[1]["deadline"] is None and rounds[1]["metrics"] == {}


def test_receipts(store: Store) -> None:
    store.record_receipts([ReceiptRow(time.time(), 1, "agent-1", "u1", "accepted", "", 100)])
    store.record_receipts([ReceiptRow(time.time(), 1, "agent-2", None, "rejected", "malformed: x", 7)])
    receipts = store.receipts()
    assert [{k: v for k, v in r.items() if k != "at"} for r in receipts] == [
        {"round": 1, "client_id": "agent-1", "update_id": "u1", "status": "accepted", "reason": "", "bytes": 100},
        {"round": 1, "client_id": "agent-2", "update_id": None, "status": "rejected", "reason": "malformed: x", "bytes": 7},
    ]
    assert receipts[0]["at"] <= receipts[1]["at"]


def test_readonly_store_never_writes(tmp_path):
    """Reports open stores read-only: a file that is not a fedge store is left exactly as it was."""
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    before = other.read_bytes()
    with Store(other, readonly=True) as store, pytest.raises(sqlite3.OperationalError, match="no such table"):
        store.rounds()
    assert other.read_bytes() == before
    with sqlite3.connect(other) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "missing.sqlite", readonly=True)


def test_secure_sessions_and_masked_inputs_are_kept_by_round_and_session_then_released(tmp_path):
    path = tmp_path / "agg.sqlite"
    with Store(path) as store:
        store._db.executescript("DROP TABLE secure_sessions; DROP TABLE secure_inputs;")  # a store made before secure aggregation
    with Store(path) as store:  # ... gets the tables on opening
        store.secure_checkpoint(1, "s1", b"snap-1", None)
        store.secure_spool(1, "s1", "a", b"masked-a")
        store.secure_spool(1, "s1", "a", b"masked-a-again")  # one input per device and session: the first stays
        store.secure_spool(1, "s1", "b", b"masked-b")
        store.secure_checkpoint(1, "s1", b"snap-2", None)
        assert store.secure_inputs(1, "s1") == [b"masked-a", b"masked-b"]
        (session,) = store.secure_sessions(1)
        assert (session.session, session.snapshot, session.outcome, session.abandoned) == ("s1", b"snap-2", None, False)

        store.secure_checkpoint(1, "s1", b"snap-3", "abandoned: below_threshold: 2 masked inputs")  # its inputs go with it
        assert store.secure_inputs(1, "s1") == [] and store.secure_sessions(1)[0].abandoned
        store.secure_checkpoint(1, "s2", b"snap-4", None)
        store.secure_spool(1, "s2", "c", b"masked-c")
        store.secure_abandon(1, "s2", "abandoned: resume_failed: damaged")
        assert store.secure_inputs(1, "s2") == [] and [s.outcome for s in store.secure_sessions(1)][1].startswith("abandoned: resume")
        store.secure_checkpoint(1, "s3", b"snap-5", "summed")
        store.secure_spool(1, "s3", "d", b"masked-d")
        store.secure_spool(2, "t1", "d", b"next-round")

        store.open_round(1, 0, None)
        store.close_round(1, 1, "fp", {"w": np.zeros(2, np.float32)}, {}, 1)
        assert store.secure_inputs(1, "s3") == [] and all(s.snapshot is None for s in store.secure_sessions(1))
        assert [s.outcome for s in store.secure_sessions(1)][2] == "summed"  # the outcomes stay, for the record
        assert store.secure_inputs(2, "t1") == [b"next-round"]  # another round's are untouched

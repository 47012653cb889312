"""The admission transaction (Store.admit via LedgerAdmission): the shared ledger of ingest workers.

Each worker process has its own store connection; here each "worker" is a Store opened on the
same file, and the race for a round's last places runs on real threads with real SQLite locks.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from aggregator.errors import Rejection, Superseded
from aggregator.rounds.sync import LedgerAdmission
from aggregator.store import Store
from fedge_contract import ReceiptStatus, Update


def update(client: str, update_id: str, *, round_no: int = 1, base: int = 0) -> Update:
    return Update(fleet="f", client_id=client, update_id=update_id, round=round_no, base_version=base, num_samples=10, tensors=())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    with Store(tmp_path / "agg.sqlite") as store:
        store.open_round(1, 0, None)
    return tmp_path / "agg.sqlite"


def admit(store: Store, u: Update, *, target: int = 3, shard: int | None = None, epoch: int | None = None) -> None:
    LedgerAdmission(store, 1, 0, target, shard=shard, epoch=epoch).commit(u, b"payload-" + u.update_id.encode())


def refusal(store: Store, u: Update, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as info:
        admit(store, u, **kwargs)
    return info.value


def test_an_update_id_is_accepted_once_across_connections(path: Path) -> None:
    with Store(path) as w0, Store(path) as w1:
        admit(w0, update("a", "u1"), shard=0)
        error = refusal(w1, update("a", "u1"), shard=1)
        assert error.status is ReceiptStatus.DUPLICATE and "already accepted" in error.reason
        assert w1.accepted_by_shard(1) == {0: 1}
        assert [s.update_id for s in w1.spooled(1, shard=0)] == ["u1"] and w1.spooled(1, shard=1) == []


def test_one_update_per_client_per_round(path: Path) -> None:
    with Store(path) as w0, Store(path) as w1:
        admit(w0, update("a", "u1"))
        error = refusal(w1, update("a", "u2"))
        assert error.status is ReceiptStatus.DUPLICATE and "already contributed to round 1" in error.reason


def test_the_target_closes_admission(path: Path) -> None:
    with Store(path) as store:
        for i in range(3):
            admit(store, update(f"c{i}", f"u{i}"))
        error = refusal(store, update("c9", "u9"))
        assert (error.status, error.reason) == (ReceiptStatus.STALE, "round 1 already has its 3 updates")
        assert store.accepted_ids(1) == ["u0", "u1", "u2"]  # the refused one left no row


@pytest.mark.parametrize(
    "round_no, base, status, text",
    [(0, 0, ReceiptStatus.STALE, "is over"), (1, -1, ReceiptStatus.STALE, "is over"), (2, 1, ReceiptStatus.REJECTED, "bad_value")],
)
def test_stale_and_ahead_updates(path: Path, round_no: int, base: int, status: ReceiptStatus, text: str) -> None:
    with Store(path) as store:
        error = refusal(store, update("a", "u1", round_no=round_no, base=base))
        assert error.status is status and text in error.reason


def test_a_closing_round_admits_nothing_until_reopened(path: Path) -> None:
    with Store(path) as coordinator, Store(path) as worker:
        admit(worker, update("a", "u1"))
        coordinator.mark_closing(1)
        error = refusal(worker, update("b", "u2"))
        assert (error.status, error.reason) == (ReceiptStatus.STALE, "round 1 is closed (aggregating 1 updates)")
        coordinator.open_round(1, 0, None)  # a restarted coordinator re-opens the round
        admit(worker, update("b", "u2"))


def test_a_round_not_opened_admits_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "agg.sqlite") as store:
        assert refusal(store, update("a", "u1")).status is ReceiptStatus.STALE


def test_precheck_gives_the_same_answer_without_writing(path: Path) -> None:
    with Store(path) as store:
        admission = LedgerAdmission(store, 1, 0, 3)
        admission.precheck(update("a", "u1"))
        assert store.accepted_ids(1) == []
        admit(store, update("a", "u1"))
        with pytest.raises(Rejection, match="already accepted"):
            admission.precheck(update("a", "u1"))


def test_a_newer_epoch_fences_out_the_old_one(path: Path) -> None:
    with Store(path) as old, Store(path) as new:
        first = old.take_over()
        admit(old, update("a", "u1"), epoch=first)
        assert new.take_over() == first + 1
        with pytest.raises(Superseded):
            admit(old, update("b", "u2"), epoch=first)
        assert new.accepted_ids(1) == ["u1"]
        admit(new, update("b", "u2"), epoch=first + 1)


def test_racing_workers_fill_exactly_the_target(path: Path) -> None:
    """Eight connections race for three places: BEGIN IMMEDIATE serialises them, none over-admits."""
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def worker(i: int) -> None:
        with Store(path) as store:
            start.wait()
            try:
                admit(store, update(f"c{i}", f"u{i}"), shard=i)
                outcomes.append("accepted")
            except Rejection as error:
                outcomes.append(error.status.value)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["accepted"] * 3 + ["stale"] * 5
    with Store(path) as store:
        assert len(store.accepted_ids(1)) == 3 and sum(store.accepted_by_shard(1).values()) == 3


_OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, base_version INTEGER NOT NULL, opened REAL NOT NULL,
    deadline REAL, closed REAL, accepted INTEGER NOT NULL DEFAULT 0, extensions INTEGER NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}');
CREATE TABLE accepted (
    update_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, round INTEGER NOT NULL,
    base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL, received REAL NOT NULL,
    bytes INTEGER NOT NULL, payload BLOB);
INSERT INTO rounds (round, base_version, opened) VALUES (1, 0, 0);
INSERT INTO accepted VALUES ('old', 'a', 1, 0, 10, 0, 7, x'00');
"""


def test_a_store_from_before_workers_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SCHEMA)
    with Store(path) as store:
        assert store.accepted_by_shard(1) == {None: 1}
        assert refusal(store, update("a", "u2")).status is ReceiptStatus.DUPLICATE  # the old row still counts
        admit(store, update("b", "u3"), shard=1)
        assert store.accepted_by_shard(1) == {None: 1, 1: 1}


def test_an_uninvited_update_is_refused_by_the_ledger_in_every_process(path):
    """The invited set lives in the store: a second process (an ingest worker) refuses the same update,
    an invited client is admitted, a past round's update is stale whoever sent it, an extension's
    invitation counts at once, and a round without a cohort invites everyone."""
    with Store(path) as coordinator, Store(path) as worker:
        coordinator.invite(1, ["a", "b"], {"version": 1})
        for store in (coordinator, worker):
            refused = refusal(store, update("mallory", f"m-{id(store)}"))
            assert refused.status is ReceiptStatus.REJECTED and refused.reason.startswith("not_invited:")
        admit(worker, update("a", "u1"))
        coordinator.open_round(2, 1, None)
        coordinator.invite(2, ["c"], {"version": 1})
        assert refusal(worker, update("c", "u2")).reason.startswith("not_invited:")  # invited to round 2, not round 1
        stale = LedgerAdmission(worker, 2, 1, 3)
        with pytest.raises(Rejection) as info:
            stale.commit(update("mallory", "m-old"), b"x")  # a past round's update: stale, whoever sent it
        assert info.value.status is ReceiptStatus.STALE
        coordinator.invite(1, ["mallory"], {"version": 1})  # an extension
        admit(worker, update("mallory", "m-late"))
        assert coordinator.invited(1) == ["a", "b", "mallory"] and coordinator.invited(2) == ["c"]
        assert coordinator.cohort_state() == {"version": 1} and coordinator.cohort_sizes() == {1: 3, 2: 1}
        coordinator.open_round(3, 2, None)
        assert coordinator.invited(3) is None
        LedgerAdmission(worker, 3, 2, 3).commit(update("anyone", "u3", round_no=3, base=2), b"x")

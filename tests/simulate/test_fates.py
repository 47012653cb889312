"""The ledger of trained updates (fedge/simulate/fates.py): each ends accepted, answered with a
reason or dropped on purpose; anything else is lost, and two acceptances are double-counted."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from aggregator.store import Store
from fedge.simulate.fates import update_fates


class Run:
    """A simulate run folder written as the programs write it: agents' JSON log lines, state files, the report, the store."""

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / "logs").mkdir(parents=True)
        with Store(out / "aggregator.sqlite"):
            pass  # the store's real schema
        self.lines: list[dict[str, object]] = []
        self.dropped: dict[str, int] = {}
        self.presence: dict[str, int] = {}

    def trained(self, client: str, update: str, number: int) -> None:
        (self.out / "agents" / client / "outbox").mkdir(parents=True, exist_ok=True)
        self.lines.append({"logger": "fedge.agent", "level": "info", "message": f"{client}: trained round {number} on v{number - 1}",
                           "client": client, "update": update, "round": number})

    def receipt(self, client: str, update: str, number: int, status: str, reason: str = "") -> None:
        self.lines.append({"logger": "fedge.agent", "message": f"{client}: update {update} {status} {reason}", "client": client,
                           "update": update, "round": number, "status": status, "reason": reason})
        with sqlite3.connect(self.out / "aggregator.sqlite") as db:
            db.execute("INSERT INTO receipts (at, round, client_id, update_id, status, reason, bytes) VALUES (0, ?, ?, ?, ?, ?, 1)",
                       (number, client, update, status, reason))

    def drop(self, client: str, update: str, number: int, why: str = "its round is over") -> None:
        self.lines.append({"logger": "fedge.agent", "level": "warning", "client": client, "update": update, "round": number,
                           "message": f"{client}: dropped update {update} of round {number} unanswered: {why}", "reason": why})
        self.dropped[client] = self.dropped.get(client, 0) + 1
        self.presence[client] = self.dropped[client]

    def accept(self, client: str, update: str, number: int, samples: int = 10) -> None:
        with sqlite3.connect(self.out / "aggregator.sqlite") as db:
            db.execute("INSERT OR IGNORE INTO rounds (round, base_version, opened, closed) VALUES (?, ?, 0, 1)", (number, number - 1))
            db.execute("INSERT INTO accepted (update_id, client_id, round, base_version, num_samples, received, bytes) "
                       "VALUES (?, ?, ?, ?, ?, 0, 1)", (update, client, number, number - 1, samples))
            total = db.execute("SELECT SUM(num_samples) FROM accepted WHERE round=?", (number,)).fetchone()[0]
            db.execute("UPDATE rounds SET metrics=? WHERE round=?", (json.dumps({"samples": total}), number))

    def write(self) -> Path:
        (self.out / "logs" / "agents-0.log").write_text("\n".join(json.dumps(line) for line in self.lines) + "\n")
        for client in {str(line["client"]) for line in self.lines}:
            state = {"trained_version": 1, "fingerprint": "f", "dropped_updates": self.dropped.get(client, 0)}
            (self.out / "agents" / client / "state.json").write_text(json.dumps(state))
        (self.out / "report.json").write_text(json.dumps({"dropped_by_device": self.presence}))
        return self.out


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path / "run")


def test_every_trained_update_has_one_fate(run):
    run.trained("a-1", "u1", 1)
    run.accept("a-1", "u1", 1)
    run.receipt("a-1", "u1", 1, "accepted")
    run.trained("a-1", "u2", 2)  # accepted, its receipt lost: the device got "duplicate" for its resend
    run.accept("a-1", "u2", 2)
    run.receipt("a-1", "u2", 2, "duplicate", "already accepted")
    run.trained("a-2", "u3", 1)
    run.receipt("a-2", "u3", 1, "stale", "round 1 on v0 is over; round 2 trains on v1")
    run.trained("a-2", "u4", 2)
    run.drop("a-2", "u4", 2)
    run.trained("a-3", "u5", 2)  # accepted, but no receipt reached the device before its round ended
    run.accept("a-3", "u5", 2)
    run.drop("a-3", "u5", 2)
    fates = update_fates(run.write())
    assert (fates.trained, fates.accepted, fates.answered, fates.dropped, fates.lost, fates.double_counted) == (5, 3, 1, 1, 0, 0)
    assert fates.accepted_but_dropped == 1
    assert fates.answered_by == {"stale: round N on vN is over; round N trains on vN": 1}
    assert fates.dropped_why == {"its round is over": 1}
    assert fates.ok, fates.problems


def test_an_update_neither_accepted_nor_answered_nor_dropped_is_lost(run):
    run.trained("a-1", "u1", 1)
    run.trained("a-1", "u2", 1)
    (run.out / "agents" / "a-1" / "outbox" / "r1-v0-u2.update").write_bytes(b"x")
    fates = update_fates(run.write())
    assert fates.lost == 2 and fates.left_in_outbox == 1 and not fates.ok
    assert sorted(fates.lost_ids) == ["a-1/u1/r1", "a-1/u2/r1 (left in its outbox)"]


def test_an_update_accepted_twice_is_double_counted(run):
    run.trained("a-1", "u1", 1)
    run.accept("a-1", "u1", 1)
    run.receipt("a-1", "u1", 1, "accepted")
    run.receipt("a-1", "u1", 1, "accepted")
    fates = update_fates(run.write())
    assert fates.double_counted == 1 and not fates.ok


def test_a_round_folding_more_samples_than_its_updates_hold_is_double_counted(run):
    run.trained("a-1", "u1", 1)
    run.accept("a-1", "u1", 1, samples=10)
    with sqlite3.connect(run.out / "aggregator.sqlite") as db:
        db.execute("UPDATE rounds SET metrics=? WHERE round=1", (json.dumps({"samples": 20}),))
    fates = update_fates(run.write())
    assert fates.double_counted == 1 and any("more samples" in p for p in fates.problems)


def test_device_counts_that_disagree_are_a_problem(run):
    run.trained("a-1", "u1", 1)
    run.drop("a-1", "u1", 1)
    run.presence["a-1"] = 0  # the presence the tap last saw does not carry the drop
    fates = update_fates(run.write())
    assert fates.dropped == 1 and fates.lost == 0
    assert fates.problems == ["a-1: 1 dropped updates logged, 1 in state.json, 0 in its presence"]


def test_an_answer_the_store_never_recorded_and_an_accepted_update_nobody_trained_are_problems(run):
    run.trained("a-1", "u1", 1)
    run.lines.append({"logger": "fedge.agent", "message": "a-1: update u1 stale", "client": "a-1", "update": "u1", "round": 1,
                      "status": "stale", "reason": "stale"})
    run.accept("a-9", "ghost", 1)
    fates = update_fates(run.write())
    assert fates.answered == 1
    assert any("never recorded" in p for p in fates.problems)
    assert any("no agent logged as trained" in p for p in fates.problems)

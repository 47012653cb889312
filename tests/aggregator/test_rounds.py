"""Synchronous round semantics: admission (duplicate / stale / rejected) and the deadline."""

from __future__ import annotations

import pytest

from aggregator.errors import Rejection
from aggregator.rounds import Accepted, DeadlineAction
from aggregator.rounds.sync import RoundPlan, SyncRound, check_admission
from aggregator.store import Standing
from fedge_contract import ReceiptStatus, Update


def make_update(client: str = "agent-1", update_id: str = "u1", *, round_no: int = 5, base: int = 4) -> Update:
    return Update(fleet="f", client_id=client, update_id=update_id, round=round_no, base_version=base, num_samples=10, tensors=())


def open_round(target: int = 3, min_updates: int = 2, timeout: float = 60.0) -> SyncRound:
    return SyncRound(number=5, base_version=4, deadline=1000.0, plan=RoundPlan(target, min_updates, timeout))


def never_seen(_: str) -> bool:
    return False


def admit(rnd: SyncRound, update: Update, seen=never_seen) -> None:
    """The sync rules against what the ledger would say of this round (the store's Standing)."""
    standing = Standing(update_seen=update.update_id in rnd.update_ids or seen(update.update_id),
                        client_seen=update.client_id in rnd.clients, accepted=rnd.accepted)
    check_admission(update, number=rnd.number, base_version=rnd.base_version, target=rnd.target, standing=standing)


def admit_and_record(rnd: SyncRound, update: Update) -> None:
    admit(rnd, update)
    rnd.record(Accepted.of(update))


def rejection(rnd: SyncRound, update: Update, seen=never_seen) -> Rejection:
    with pytest.raises(Rejection) as info:
        admit(rnd, update, seen)
    return info.value


def test_fresh_update_is_admitted_and_counted() -> None:
    rnd = open_round()
    admit_and_record(rnd, make_update())
    assert rnd.accepted == 1 and rnd.clients == {"agent-1"} and rnd.update_ids == {"u1"}
    assert not rnd.complete


def test_duplicate_update_id_in_this_round() -> None:
    rnd = open_round()
    admit_and_record(rnd, make_update())
    assert rejection(rnd, make_update()).status is ReceiptStatus.DUPLICATE
    assert rnd.accepted == 1


def test_duplicate_update_id_seen_before() -> None:
    """An id the store already holds (an earlier round, or before a restart) is a duplicate."""
    error = rejection(open_round(), make_update(update_id="old"), seen=lambda uid: uid == "old")
    assert error.status is ReceiptStatus.DUPLICATE
    admit(open_round(), make_update(update_id="new"), lambda uid: uid == "old")  # others pass


def test_duplicate_wins_over_stale() -> None:
    """A resend of an update accepted in an earlier round gets 'duplicate' (the agent may drop it)."""
    error = rejection(open_round(), make_update(update_id="old", round_no=4, base=3), seen=lambda uid: uid == "old")
    assert error.status is ReceiptStatus.DUPLICATE


def test_same_client_twice_in_a_round() -> None:
    rnd = open_round()
    admit_and_record(rnd, make_update("agent-1", "u1"))
    error = rejection(rnd, make_update("agent-1", "u2"))
    assert error.status is ReceiptStatus.DUPLICATE and "agent-1" in error.reason
    admit_and_record(rnd, make_update("agent-2", "u3"))
    assert rnd.accepted == 2


@pytest.mark.parametrize("round_no, base", [(5, 3), (4, 4), (4, 3), (0, 0)])
def test_older_round_or_base_is_stale(round_no: int, base: int) -> None:
    assert rejection(open_round(), make_update(round_no=round_no, base=base)).status is ReceiptStatus.STALE


@pytest.mark.parametrize("round_no, base", [(5, 5), (6, 4), (9, 9)])
def test_newer_round_or_base_is_rejected(round_no: int, base: int) -> None:
    error = rejection(open_round(), make_update(round_no=round_no, base=base))
    assert error.status is ReceiptStatus.REJECTED
    assert error.reason.startswith("bad_value")


def test_full_round_turns_stragglers_stale() -> None:
    rnd = open_round(target=2, min_updates=1)
    admit_and_record(rnd, make_update("a", "u1"))
    admit_and_record(rnd, make_update("b", "u2"))
    assert rnd.complete
    assert rejection(rnd, make_update("c", "u3")).status is ReceiptStatus.STALE
    assert rnd.accepted == 2


def test_at_deadline_closes_when_min_is_reached() -> None:
    rnd = open_round(target=3, min_updates=2)
    admit_and_record(rnd, make_update("a", "u1"))
    admit_and_record(rnd, make_update("b", "u2"))
    assert rnd.at_deadline(now=1000.5) is DeadlineAction.CLOSE
    assert rnd.deadline == 1000.0 and rnd.extensions == 0


def test_at_deadline_extends_below_min() -> None:
    rnd = open_round(target=3, min_updates=2, timeout=60.0)
    admit_and_record(rnd, make_update("a", "u1"))
    assert rnd.at_deadline(now=1001.0) is DeadlineAction.EXTEND
    assert rnd.deadline == 1061.0 and rnd.extensions == 1
    assert rnd.at_deadline(now=1062.0) is DeadlineAction.EXTEND
    assert rnd.deadline == 1122.0 and rnd.extensions == 2
    admit_and_record(rnd, make_update("b", "u2"))
    assert rnd.at_deadline(now=1123.0) is DeadlineAction.CLOSE
    assert rnd.extensions == 2


def test_empty_round_extends() -> None:
    rnd = open_round(target=1, min_updates=1, timeout=5.0)
    assert rnd.at_deadline(now=1000.0) is DeadlineAction.EXTEND
    assert rnd.deadline == 1005.0


def test_round_plan_accepts_valid_values() -> None:
    plan = RoundPlan(target=10, min_updates=10, timeout=0.5)
    assert (plan.target, plan.min_updates, plan.timeout) == (10, 10, 0.5)
    RoundPlan(target=1, min_updates=1, timeout=1.0)


@pytest.mark.parametrize(
    "target, min_updates, timeout",
    [(0, 0, 60.0), (0, 1, 60.0), (3, 0, 60.0), (3, 4, 60.0), (3, 1, 0.0), (3, 1, -1.0), (-1, -1, 1.0)],
)
def test_round_plan_rejects_invalid_values(target: int, min_updates: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        RoundPlan(target, min_updates, timeout)

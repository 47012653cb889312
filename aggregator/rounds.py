"""Synchronous round semantics (DESIGN.md, Rounds), as pure logic with the time passed in.

A round ``r`` trains on model version ``base_version``. It accepts one update per client, each
update id once ever, only from ``base_version``. It closes as soon as ``target`` updates are in;
at the deadline it closes if at least ``min_updates`` are in, and is extended otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator.errors import Rejection
from fedge_contract import ReceiptStatus, Update


class DeadlineAction(enum.Enum):
    CLOSE = "close"
    EXTEND = "extend"


@dataclass(frozen=True)
class RoundPlan:
    target: int  # updates that close the round early
    min_updates: int  # updates needed to close at the deadline
    timeout: float  # seconds from opening (or extension) to the deadline

    def __post_init__(self) -> None:
        if self.target < 1 or not 1 <= self.min_updates <= self.target or self.timeout <= 0:
            raise ValueError(f"need 1 <= min ({self.min_updates}) <= target ({self.target}) and timeout > 0")


@dataclass(frozen=True)
class Standing:
    """What the ledger knows that decides an update's admission (read in the admitting transaction)."""

    update_seen: bool  # this update id was accepted before (in any round)
    client_seen: bool  # the client already contributed to this round
    accepted: int  # updates accepted into this round so far
    closing: bool = False  # the round stopped admitting: it is being aggregated (or is over)


def check_admission(update: Update, *, number: int, base_version: int, target: int, standing: Standing) -> None:
    """Raise a Rejection (duplicate, stale, rejected) unless ``update`` may join round ``number``.

    The one set of rules and receipt texts, whether the round lives in this process (OpenRound)
    or in the store shared by ingest workers (Store.admit).
    """
    if standing.update_seen:
        raise Rejection(ReceiptStatus.DUPLICATE, f"update {update.update_id} was already accepted")
    if update.base_version < base_version or update.round < number:
        raise Rejection(
            ReceiptStatus.STALE,
            f"round {update.round} on v{update.base_version} is over; round {number} trains on v{base_version}",
        )
    if update.base_version > base_version or update.round > number:
        raise Rejection(
            ReceiptStatus.REJECTED,
            f"bad_value: round {update.round} on v{update.base_version} is ahead of the open round {number} on v{base_version}",
        )
    if standing.client_seen:
        raise Rejection(ReceiptStatus.DUPLICATE, f"client {update.client_id} already contributed to round {number}")
    if standing.accepted >= target:
        raise Rejection(ReceiptStatus.STALE, f"round {number} already has its {target} updates")
    if standing.closing:
        raise Rejection(ReceiptStatus.STALE, f"round {number} is closed (aggregating {standing.accepted} updates)")


@dataclass
class OpenRound:
    number: int
    base_version: int
    deadline: float
    plan: RoundPlan
    clients: set[str] = field(default_factory=set)
    update_ids: set[str] = field(default_factory=set)
    extensions: int = 0

    @property
    def accepted(self) -> int:
        return len(self.update_ids)

    @property
    def full(self) -> bool:
        return self.accepted >= self.plan.target

    def admit(self, update: Update, seen_before: Callable[[str], bool]) -> None:
        """Raise a Rejection (duplicate, stale, rejected) unless the update may join this round."""
        standing = Standing(
            update_seen=update.update_id in self.update_ids or seen_before(update.update_id),
            client_seen=update.client_id in self.clients,
            accepted=self.accepted,
        )
        check_admission(update, number=self.number, base_version=self.base_version, target=self.plan.target, standing=standing)

    def record(self, client_id: str, update_id: str) -> None:
        self.clients.add(client_id)
        self.update_ids.add(update_id)

    def at_deadline(self, now: float) -> DeadlineAction:
        """What to do when the deadline passes; extending moves the deadline."""
        if self.accepted >= self.plan.min_updates:
            return DeadlineAction.CLOSE
        self.deadline = now + self.plan.timeout
        self.extensions += 1
        return DeadlineAction.EXTEND

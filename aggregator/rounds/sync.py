"""Synchronous rounds (DESIGN.md, Rounds): every rule of this mode, as pure logic with the time passed in.

A round ``r`` trains on model version ``base_version``. It accepts one update per client, each
update id once ever, only from ``base_version``. It closes as soon as ``target`` updates are in;
at the deadline it closes if at least ``min_updates`` are in, and is extended otherwise.

Admission is decided by the store's ledger (``LedgerAdmission``), in the transaction that spools
the update: the same rules whether this process ingests or worker processes do (aggregator/workers/),
so dedupe and the target hold across processes. With a cohort (``[rounds] over_select``), the
round invites ``ceil(target x over_select)`` devices (rounds/invitations.py) and admission refuses
the others, from the invited set the store holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.errors import Rejection
from aggregator.rounds.cohort import Selection
from aggregator.rounds.invitations import Invitations
from aggregator.rounds.policy import Accepted, Admission, DeadlineAction, Plain, RoundServices, Sampling
from aggregator.store import Standing, Store, StoreAccess
from fedge_contract import ReceiptStatus, Topics, Update
from fedge_contract.cohort import InviteSet
from fedge_contract.errors import Reason


@dataclass(frozen=True)
class RoundPlan:
    target: int  # updates that close the round early
    min_updates: int  # updates needed to close at the deadline
    timeout: float  # seconds from opening (or extension) to the deadline

    def __post_init__(self) -> None:
        if self.target < 1 or not 1 <= self.min_updates <= self.target or self.timeout <= 0:
            raise ValueError(f"need 1 <= min ({self.min_updates}) <= target ({self.target}) and timeout > 0")


def check_admission(update: Update, *, number: int, base_version: int, target: int, standing: Standing) -> None:
    """Raise a Rejection (duplicate, stale, rejected) unless ``update`` may join round ``number``.

    The one set of rules and receipt texts of synchronous rounds. An update for a past round is
    ``stale`` whoever sent it; one for the open round from a device its cohort did not invite is
    ``rejected: not_invited`` (before the per-client and target checks: it never takes a place).
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
    if not standing.invited:
        raise Rejection(ReceiptStatus.REJECTED, f"{Reason.NOT_INVITED.value}: {update.client_id} was not invited to round {number}")
    if standing.client_seen:
        raise Rejection(ReceiptStatus.DUPLICATE, f"client {update.client_id} already contributed to round {number}")
    if standing.accepted >= target:
        raise Rejection(ReceiptStatus.STALE, f"round {number} already has its {target} updates")
    if standing.closing:
        raise Rejection(ReceiptStatus.STALE, f"round {number} is closed (aggregating {standing.accepted} updates)")


@dataclass(frozen=True)
class LedgerAdmission:
    """Admission into a synchronous round through the store's ``accepted`` table, the ledger every ingest process shares."""

    store: Store
    number: int
    base_version: int
    target: int
    shard: int | None = None  # the worker admitting (None: the aggregator itself)
    epoch: int | None = None  # fences out the workers of an aggregator that was replaced

    def _rules(self, update: Update) -> Callable[[Standing], None]:
        def check(standing: Standing) -> None:
            check_admission(update, number=self.number, base_version=self.base_version, target=self.target, standing=standing)

        return check

    def precheck(self, update: Update) -> None:
        self._rules(update)(self.store.standing(self.number, update.update_id, update.client_id))

    def commit(self, update: Update, payload: bytes) -> float:
        self.store.admit(
            update_id=update.update_id, client_id=update.client_id, round_no=self.number, base_version=update.base_version,
            num_samples=update.num_samples, payload=payload, check=self._rules(update), shard=self.shard, epoch=self.epoch,
        )
        return 1.0


@dataclass
class SyncRound(Plain):
    """One open synchronous round: who contributed, its deadline, and whom it invited (with a cohort)."""

    number: int
    base_version: int
    deadline: float
    plan: RoundPlan
    clients: set[str] = field(default_factory=set)
    update_ids: set[str] = field(default_factory=set)
    extensions: int = 0
    selection: Selection | None = None  # the cohort (None: every device is invited)
    invitations: Invitations | None = None  # what selected it (extensions invite more)

    @property
    def accepted(self) -> int:
        return len(self.update_ids)

    @property
    def target(self) -> int:
        return self.plan.target

    @property
    def min_updates(self) -> int:
        return self.plan.min_updates

    @property
    def complete(self) -> bool:
        return self.accepted >= self.plan.target

    def admission(self, store: Store, *, shard: int | None = None, epoch: int | None = None) -> Admission:
        return LedgerAdmission(store, self.number, self.base_version, self.plan.target, shard=shard, epoch=epoch)

    def factor(self, update: Accepted) -> float:
        return 1.0

    def record(self, accepted: Accepted) -> None:
        self.clients.add(accepted.client_id)
        self.update_ids.add(accepted.update_id)

    def at_deadline(self, now: float) -> DeadlineAction:
        """What to do when the deadline passes; extending moves the deadline."""
        if self.accepted >= self.plan.min_updates:
            return DeadlineAction.CLOSE
        self.deadline = now + self.plan.timeout
        self.extensions += 1
        return DeadlineAction.EXTEND

    async def on_deadline(self, now: float) -> DeadlineAction:
        return self.at_deadline(now)

    def extend_to(self, until: float) -> None:
        self.deadline = max(self.deadline, until)

    async def extend(self, db: StoreAccess) -> None:
        """The deadline extended the round: a cohort invites more devices (stored before the re-announcement)."""
        if self.selection is not None and self.invitations is not None:
            self.selection = await self.invitations.extend(self.selection, self.clients, self.accepted, db)

    async def invite_newcomers(self, db: StoreAccess, now: float) -> bool:
        if self.selection is None or self.invitations is None:
            return False
        before, self.selection = self.selection, await self.invitations.top_up(self.selection, now, db)
        return self.selection is not before

    def invitation(self) -> InviteSet | None:
        if self.selection is None or self.invitations is None:
            return None
        return self.invitations.announced(self.selection)

    def metrics(self) -> dict[str, float]:
        if self.selection is None:
            return {}
        s = self.selection
        return {"invited": float(len(s.invited)), "pool": float(s.pool), "sampling_rate": s.sampling_rate,
                "invited_trained": float(len(self.clients & s.invited))}

    @classmethod
    def admitting(cls, number: int, base_version: int, target: int) -> SyncRound:
        """The round as an ingest worker holds it: only what admission needs (the coordinator keeps the deadline)."""
        return cls(number, base_version, deadline=float("inf"), plan=RoundPlan(target=target, min_updates=1, timeout=float("inf")))


@dataclass(frozen=True)
class SyncPolicy:
    """Synchronous rounds with a deadline, a target and a minimum (the default mode), and with
    ``invitations`` a cohort per round (rounds/invitations.py)."""

    plan: RoundPlan
    invitations: Invitations | None = None
    mode: str = "sync"

    def task_extra(self) -> Mapping[str, Any]:
        return {}

    def subscriptions(self, topics: Topics) -> list[str]:
        return []

    def bind(self, services: RoundServices) -> None:
        """Plain rounds need nothing of the coordinator's connection."""

    async def check_in(self, version: int, now: float, db: StoreAccess) -> float | None:
        if self.invitations is None:
            return None
        return await self.invitations.check_in(version + 1, now, db)

    async def open(self, version: int, now: float, db: StoreAccess) -> SyncRound:
        number = version + 1
        selection = None if self.invitations is None else await self.invitations.select(number, db)
        return SyncRound(number=number, base_version=version, deadline=now + self.plan.timeout, plan=self.plan,
                         selection=selection, invitations=self.invitations)

    def sampling(self) -> Sampling | None:
        if self.invitations is None:
            return None
        return self.invitations.sampling()

"""What a round is, as the coordinator sees it: a small protocol that each round mode implements.

The coordinator (aggregator/coordinator.py) runs every mode with one loop::

    await policy.check_in(version, now, db)       # a cohort waits for devices; events are handled meanwhile
    rnd = await policy.open(version, now, db)     # what the store knows that the mode needs
    announce(rnd); collect until rnd.complete or its deadline says close (or extend); close(rnd)

A round may speak a protocol of its own beside updates (secure aggregation's phases: ``owns``,
``on_message``, ``on_deadline`` that returns CONTINUE, ``own_sum``, ``note``); rounds without one
inherit ``Plain``'s answers. Such a mode publishes through the coordinator's connection, which the
coordinator lends it once connected (``RoundPolicy.bind`` with ``RoundServices``).

A mode is a ``RoundPolicy`` (a factory of rounds and what it announces) and its ``Round``s
(the state of one open round, its admission rules, its deadline). Each mode keeps all its rules
in its own module: synchronous rounds in ``rounds/sync.py``, the FedBuff buffer in
``rounds/buffered.py``. Ingest (in this process or in worker processes) asks the round for an
``Admission`` and never decides itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedge_contract import Receipt, Topics, Update

if TYPE_CHECKING:
    from aggregator.aggregation.defence import Collector
    from aggregator.observability.fleet import FleetView
    from aggregator.store import Store, StoreAccess
    from fedge_contract.cohort import InviteSet
    from fedge_contract.mqtt import Connection
    from fedge_contract.tensors import ModelSpec


class DeadlineAction(enum.Enum):
    CLOSE = "close"  # close the round now
    EXTEND = "extend"  # the deadline moved: announce the round again
    CONTINUE = "continue"  # the round handled its own timer (a phase of its protocol): keep collecting


@dataclass(frozen=True)
class Accepted:
    """An update the round admitted (from this process's ingest or a worker's report)."""

    client_id: str
    update_id: str
    base_version: int

    @classmethod
    def of(cls, update: Update) -> Accepted:
        return cls(update.client_id, update.update_id, update.base_version)


@dataclass(frozen=True)
class Sampling:
    """How a mode sampled its rounds' participants, for the privacy accountant (aggregation/privacy.py)."""

    rates: Mapping[int, float]  # round -> the largest probability any device had of being invited to it
    most_invitations: int  # the most rounds one device was invited to (what an observer of the announcements composes)


@dataclass(frozen=True)
class RoundServices:
    """What the coordinator lends its round policy once connected (``RoundPolicy.bind``): a mode with a
    protocol of its own (secure aggregation) publishes through the connection and invites from the fleet view."""

    transport: Connection  # the coordinator's connection: publish, subscribe, unsubscribe
    spec: ModelSpec  # the global model's tensors
    fleet: FleetView  # each device's last presence
    answer: Callable[[Receipt, int], None]  # publish a refusal's receipt (counted with the others); the refused payload's size


class Admission(Protocol):
    """How one round decides and persists the admission of an update (ingest calls it)."""

    @property
    def number(self) -> int: ...

    @property
    def base_version(self) -> int: ...

    def precheck(self, update: Update) -> None:
        """Raise a Rejection if the update is already known to be refused (may be out of date)."""

    def commit(self, update: Update, payload: bytes) -> float:
        """Admit and spool atomically, or raise a Rejection; returns the update's weight factor."""


class Round(Protocol):
    """One open round (sync) or buffer (async): numbers, progress, admission, deadline, metrics."""

    @property
    def number(self) -> int: ...

    @property
    def base_version(self) -> int: ...

    @property
    def accepted(self) -> int: ...

    @property
    def target(self) -> int: ...

    @property
    def min_updates(self) -> int: ...

    @property
    def deadline(self) -> float | None:
        """Unix seconds at which ``on_deadline`` decides; None: no deadline (the round waits for its target)."""

    @property
    def complete(self) -> bool:
        """Close now: the round has what it waits for."""

    def admission(self, store: Store, *, shard: int | None = None, epoch: int | None = None) -> Admission:
        """This round's admission, against ``store`` (a Store: the ledger every ingest process shares)."""

    def factor(self, update: Accepted) -> float:
        """The weight factor of an admitted update when it is (re-)folded (1 in sync mode)."""

    def record(self, accepted: Accepted) -> None:
        """Count an admitted update."""

    async def on_deadline(self, now: float) -> DeadlineAction:
        """The deadline passed: close, extend (which moves ``deadline``), or continue (a phase of the round's protocol ended)."""

    def extend_to(self, until: float) -> None:
        """Stay open at least until ``until`` (a grace for devices coming back after a restart or reconnect)."""

    async def extend(self, db: StoreAccess) -> None:
        """``on_deadline`` extended the round: what the mode does before it is re-announced (a cohort invites more)."""

    async def invite_newcomers(self, db: StoreAccess, now: float) -> bool:
        """Devices checked in (presence) while the round is open: whether it invited some (it is then re-announced)."""

    def invitation(self) -> InviteSet | None:
        """Who the announcement invites to train (None: every device)."""

    def metrics(self) -> dict[str, float]:
        """Mode-specific figures stored with the closed round."""

    @property
    def note(self) -> str:
        """What RoundStatus says about the round beyond its numbers ("" for most modes; a secure round's phase)."""

    # A round may speak a protocol of its own beside updates (secure aggregation's phases):
    def owns(self, topic: str) -> bool:
        """Whether a message on ``topic`` is the round's own (its protocol's), not an update for the ingest."""

    async def on_message(self, topic: str, payload: bytes, now: float) -> list[Receipt]:
        """One message the round ``owns``; the receipts that refuse it (none: taken)."""

    def own_sum(self) -> Collector | None:
        """The round's sum when the round computed it itself (secure aggregation); None: the ingest source's."""

    async def on_reconnect(self) -> None:
        """The connection came back (the broker may have lost retained messages): publish the round's own again."""

    async def close(self) -> None:
        """The round is over, or the aggregator stops: release what the round holds."""


class Plain:
    """What a round without a protocol of its own (sync rounds, the FedBuff buffer) answers to the hooks above."""

    @property
    def note(self) -> str:
        return ""

    def owns(self, topic: str) -> bool:
        return False

    async def on_message(self, topic: str, payload: bytes, now: float) -> list[Receipt]:
        raise AssertionError(f"{type(self).__name__} owns no topic, not {topic!r}")

    def own_sum(self) -> Collector | None:
        return None

    async def on_reconnect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def extend(self, db: StoreAccess) -> None:
        return None

    async def invite_newcomers(self, db: StoreAccess, now: float) -> bool:
        return False

    def invitation(self) -> InviteSet | None:
        return None  # every device is invited


class RoundPolicy(Protocol):
    """A round mode: the rounds it opens and what it adds to the announcement."""

    @property
    def mode(self) -> str: ...

    def subscriptions(self, topics: Topics) -> list[str]:
        """Topics the rounds' own protocol needs beside updates and presence (none for most modes)."""

    def bind(self, services: RoundServices) -> None:
        """The coordinator is connected: what its rounds may use (called once, before the first ``open``)."""

    def task_extra(self) -> Mapping[str, Any]:
        """Fields the GlobalModel's task carries for agents (async: mode and max_staleness)."""

    async def check_in(self, version: int, now: float, db: StoreAccess) -> float | None:
        """None once the round on ``version`` may open; else until when the coordinator handles events (the
        fleet's presence: devices checking in) before it asks again."""

    async def open(self, version: int, now: float, db: StoreAccess) -> Round:
        """The round that trains on ``version`` (``db``: what the store knows that the mode needs)."""

    def sampling(self) -> Sampling | None:
        """How the rounds' participants were sampled (None: not sampled, every device may take part)."""

"""Asynchronous (FedBuff) rounds: every rule of this mode, as pure logic.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation" (AISTATS 2022). Agents
train whenever they can on the newest model they hold; the aggregator keeps one buffer and
publishes a new model version every ``buffer_size`` accepted updates.

- Versions and rounds: the buffer that will produce version ``v+1`` is "round ``v+1``"; the
  GlobalModel for version ``v`` says ``round = v + 1`` and ``deadline = None``. An update trained
  on ``v`` therefore carries ``round = base_version + 1`` (as in synchronous mode).
- Staleness ``s = current - base_version``: accepted when ``0 <= s <= max_staleness``, receipt
  ``stale`` beyond, ``rejected`` when the base is a version that does not exist yet.
- Dedupe: an ``update_id`` is accepted once ever (the store); a client contributes at most one
  update per base version (it trains each version once; a second one is a replay or a reset
  device: ``duplicate``). A client may have several updates in one buffer when they come from
  different base versions (a slow upload of an old version, then a fresh one).
- Weighting (FedBuff's unnormalised staleness discount, sample-weighted): the buffer's
  pseudo-gradient is ``sum_k n_k * f(s_k) * delta_k / sum_k n_k``, where ``f`` is the staleness
  function. Normalising by ``sum n_k f(s_k)`` instead would cancel the discount whenever all
  updates in a buffer are equally stale. ``s`` is fixed at acceptance: the version only moves
  when the buffer is flushed.
- Admission is decided in this process, in memory (the buffer's staleness window), and spooled to
  the store in the same step; async mode therefore runs without ingest workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.errors import Rejection
from aggregator.rounds.policy import Accepted, Admission, DeadlineAction, Plain, RoundServices
from aggregator.store import Store, StoreAccess, call
from fedge_contract import ReceiptStatus, Topics, Update

StalenessFn = Callable[[int], float]


def staleness_function(name: str) -> StalenessFn:
    """``sqrt`` (default): 1/sqrt(1+s); ``constant``: 1; ``poly:A``: (1+s)**-A (sqrt = poly:0.5)."""
    if name == "sqrt":
        return lambda s: 1.0 / math.sqrt(1 + s)
    if name == "constant":
        return lambda s: 1.0
    if name.startswith("poly:"):
        try:
            a = float(name[5:])
        except ValueError:
            a = -1.0
        if a >= 0 and math.isfinite(a):
            return lambda s: (1.0 + s) ** -a
    raise ValueError(f"unknown staleness function {name!r}: use sqrt, constant or poly:<exponent >= 0>")


@dataclass(frozen=True)
class BufferPlan:
    target: int  # buffer_size: updates that trigger a new version
    max_staleness: int

    def __post_init__(self) -> None:
        if self.target < 1 or self.max_staleness < 0:
            raise ValueError(f"need buffer_size >= 1 (got {self.target}) and max_staleness >= 0 (got {self.max_staleness})")


@dataclass
class Buffer(Plain):
    """The open buffer on top of version ``base_version``; it produces version ``number``."""

    base_version: int
    plan: BufferPlan
    staleness: StalenessFn
    contributed: set[tuple[str, int]] = field(default_factory=set)  # (client, base version) in the window
    update_ids: set[str] = field(default_factory=set)  # accepted into this buffer
    staleness_sum: int = 0
    staleness_max: int = 0

    @property
    def number(self) -> int:
        return self.base_version + 1

    @property
    def accepted(self) -> int:
        return len(self.update_ids)

    @property
    def target(self) -> int:
        return self.plan.target

    @property
    def min_updates(self) -> int:
        return self.plan.target

    @property
    def deadline(self) -> None:
        return None  # the buffer waits for its updates

    @property
    def complete(self) -> bool:
        return self.accepted >= self.plan.target

    def admit(self, update: Update, seen_before: Callable[[str], bool]) -> float:
        """The update's staleness factor f(s), or a Rejection (duplicate, stale, rejected)."""
        if update.update_id in self.update_ids or seen_before(update.update_id):
            raise Rejection(ReceiptStatus.DUPLICATE, f"update {update.update_id} was already accepted")
        s = self.base_version - update.base_version
        if s < 0:
            raise Rejection(ReceiptStatus.REJECTED, f"bad_value: base version v{update.base_version} is ahead of the newest v{self.base_version}")
        if s > self.plan.max_staleness:
            raise Rejection(
                ReceiptStatus.STALE,
                f"v{update.base_version} is {s} versions old, beyond max_staleness {self.plan.max_staleness} (newest v{self.base_version})",
            )
        if (update.client_id, update.base_version) in self.contributed:
            raise Rejection(ReceiptStatus.DUPLICATE, f"client {update.client_id} already contributed an update trained on v{update.base_version}")
        return self.staleness(s)

    def admission(self, store: Store, *, shard: int | None = None, epoch: int | None = None) -> Admission:
        if shard is not None:
            raise ValueError("async mode admits in memory, in one process: it runs without ingest workers")
        return BufferAdmission(store, self)

    def factor(self, update: Accepted) -> float:
        return self.staleness(self.base_version - update.base_version)

    def record(self, accepted: Accepted) -> None:
        self.contributed.add((accepted.client_id, accepted.base_version))
        self.update_ids.add(accepted.update_id)
        s = self.base_version - accepted.base_version
        self.staleness_sum += s
        self.staleness_max = max(self.staleness_max, s)

    async def on_deadline(self, now: float) -> DeadlineAction:
        raise AssertionError("a FedBuff buffer has no deadline")

    def extend_to(self, until: float) -> None:
        """A buffer has no deadline: it waits for its updates however long they take."""

    def metrics(self) -> dict[str, float]:
        return {"staleness_mean": self.staleness_sum / max(self.accepted, 1), "staleness_max": float(self.staleness_max)}

    def next(self) -> Buffer:
        """The empty buffer on top of the version this one produced; the dedupe window slides."""
        return open_buffer(self.number, self.plan, self.staleness, self.contributed)


def open_buffer(version: int, plan: BufferPlan, staleness: StalenessFn, contributed: Iterable[tuple[str, int]] = ()) -> Buffer:
    """A buffer on ``version``; ``contributed`` restores the dedupe window (after a restart, or from the previous buffer)."""
    oldest = version - plan.max_staleness
    return Buffer(version, plan, staleness, {(c, v) for c, v in contributed if v >= oldest})


@dataclass(frozen=True)
class BufferAdmission:
    """Async mode admits in memory (the buffer's staleness window) and spools to the store in the same step."""

    store: Store
    buffer: Buffer

    @property
    def number(self) -> int:
        return self.buffer.number

    @property
    def base_version(self) -> int:
        return self.buffer.base_version

    def precheck(self, update: Update) -> None:
        self.buffer.admit(update, self.store.is_accepted)

    def commit(self, update: Update, payload: bytes) -> float:
        factor = self.buffer.admit(update, self.store.is_accepted)
        self.store.spool(
            update_id=update.update_id, client_id=update.client_id, round_no=self.buffer.number,
            base_version=update.base_version, num_samples=update.num_samples, payload=payload,
        )
        return factor


class BufferedPolicy:
    """FedBuff: a new version every ``buffer_size`` accepted updates, staleness-weighted."""

    mode = "async"

    def __init__(self, plan: BufferPlan, staleness: str) -> None:
        self.plan = plan
        self.staleness = staleness_function(staleness)
        self._last: Buffer | None = None  # the buffer opened last: the next one slides its dedupe window

    def task_extra(self) -> Mapping[str, Any]:
        return {"mode": "async", "max_staleness": self.plan.max_staleness}

    async def check_in(self, version: int, now: float, db: StoreAccess) -> None:
        return None

    def sampling(self) -> None:
        return None

    def subscriptions(self, topics: Topics) -> list[str]:
        return []

    def bind(self, services: RoundServices) -> None:
        """Plain rounds need nothing of the coordinator's connection."""

    async def open(self, version: int, now: float, db: StoreAccess) -> Buffer:
        last = self._last
        if last is not None and last.number == version:
            buffer = last.next()
        else:  # the first buffer of this run: the dedupe window from the store
            contributed = await call(db, Store.contributions, version - self.plan.max_staleness)
            buffer = open_buffer(version, self.plan, self.staleness, contributed)
        self._last = buffer
        return buffer

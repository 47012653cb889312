"""Asynchronous (FedBuff) rounds as pure logic: staleness, admission, the buffer.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator.errors import Rejection
from fedge_contract import ReceiptStatus, Update

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


def scaled(delta: Mapping[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """``delta * factor`` in float32 (one temporary model copy: memory stays O(model))."""
    return {k: v * np.float32(factor) for k, v in delta.items()}


@dataclass(frozen=True)
class BufferPlan:
    target: int  # buffer_size: updates that trigger a new version
    min_updates: int
    max_staleness: int

    def __post_init__(self) -> None:
        if self.target < 1 or self.max_staleness < 0:
            raise ValueError(f"need buffer_size >= 1 (got {self.target}) and max_staleness >= 0 (got {self.max_staleness})")


@dataclass
class AsyncBuffer:
    """The open buffer on top of version ``base_version``; it produces version ``number``."""

    base_version: int
    plan: BufferPlan
    staleness: StalenessFn
    contributed: set[tuple[str, int]] = field(default_factory=set)  # (client, base version) in the window
    update_ids: set[str] = field(default_factory=set)  # accepted into this buffer
    staleness_sum: int = 0
    staleness_max: int = 0
    deadline: None = None  # async mode has none: the buffer waits for its updates

    @property
    def number(self) -> int:
        return self.base_version + 1

    @property
    def accepted(self) -> int:
        return len(self.update_ids)

    @property
    def full(self) -> bool:
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

    def record(self, client_id: str, update_id: str, base_version: int) -> None:
        self.contributed.add((client_id, base_version))
        self.update_ids.add(update_id)
        s = self.base_version - base_version
        self.staleness_sum += s
        self.staleness_max = max(self.staleness_max, s)

    def next(self) -> AsyncBuffer:
        """The empty buffer on top of the version this one produced; the dedupe window slides."""
        oldest = self.number - self.plan.max_staleness
        kept = {(c, v) for c, v in self.contributed if v >= oldest}
        return AsyncBuffer(self.number, self.plan, self.staleness, kept)


def open_buffer(version: int, plan: BufferPlan, staleness: StalenessFn, contributed: Iterable[tuple[str, int]] = ()) -> AsyncBuffer:
    """A buffer on ``version``; ``contributed`` restores the dedupe window after a restart."""
    oldest = version - plan.max_staleness
    return AsyncBuffer(version, plan, staleness, {(c, v) for c, v in contributed if v >= oldest})

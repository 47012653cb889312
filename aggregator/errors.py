"""Errors of the aggregator.

    AggregatorError              root
     +-- Rejection               one update refused; becomes a receipt (status + reason), never a crash
     +-- StoreMismatch           the store holds another fleet's or another architecture's model
     +-- Superseded              another aggregator took over the store (this one, or its worker, must stop)
     +-- LedgerMismatch          the partial sums merged for a round do not cover exactly its accepted updates
     +-- WorkerFailed            an ingest worker could not start
     +-- SecureResultLost        a secure round's sum was computed but the store cannot recompute it
"""

from __future__ import annotations

from fedge_contract import ReceiptStatus


class AggregatorError(Exception):
    """Root of the aggregator's errors."""


class Rejection(AggregatorError):
    def __init__(self, status: ReceiptStatus, reason: str) -> None:
        super().__init__(f"{status.value}: {reason}")
        self.status = status
        self.reason = reason


class StoreMismatch(AggregatorError):
    """Refuse to resume from a store that does not belong to this fleet and task."""


class Superseded(AggregatorError):
    """A newer aggregator started on this store: an older one's workers must not admit anything more."""


class LedgerMismatch(AggregatorError):
    """The merged update ids of a round differ from the store's: a bug, never papered over."""


class WorkerFailed(AggregatorError):
    """An ingest worker exited before it was ready (bad config, broker refused it, import error)."""


class SecureResultLost(AggregatorError):
    """A secure round whose session produced its sum before the aggregator stopped, and whose checkpoint and
    spool no longer give it back (a damaged store). Another session of the same round would give a second
    sum over other survivors, and the difference of two sums reveals the devices in one but not the other:
    the aggregator stops rather than open one."""

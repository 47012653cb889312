"""Errors of the aggregator.

    AggregatorError              root
     +-- Rejection               one update refused; becomes a receipt (status + reason), never a crash
     +-- StoreMismatch           the store holds another fleet's or another architecture's model
     +-- Superseded              another aggregator took over the store (this one, or its worker, must stop)
     +-- LedgerMismatch          the partial sums merged for a round do not cover exactly its accepted updates
     +-- WorkerFailed            an ingest worker could not start
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

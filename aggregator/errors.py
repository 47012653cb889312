"""Errors of the aggregator.

    AggregatorError              root
     +-- Rejection               one update refused; becomes a receipt (status + reason), never a crash
     +-- StoreMismatch           the store holds another fleet's or another architecture's model
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

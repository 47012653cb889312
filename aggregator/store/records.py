"""What the store hands out: checkpoints, spooled updates, receipt rows and an update's standing in its round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class Checkpoint:
    version: int
    fingerprint: str
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]


class ReceiptRow(NamedTuple):
    """A receipt as the ``receipts`` table records it."""

    at: float
    round: int
    client_id: str
    update_id: str | None
    status: str
    reason: str
    bytes: int


@dataclass(frozen=True)
class SpooledUpdate:
    update_id: str
    client_id: str
    num_samples: int
    payload: bytes


@dataclass(frozen=True)
class Standing:
    """What the ledger knows that decides an update's admission (read in the admitting transaction)."""

    update_seen: bool  # this update id was accepted before (in any round)
    client_seen: bool  # the client already contributed to this round
    accepted: int  # updates accepted into this round so far
    closing: bool = False  # the round stopped admitting: it is being aggregated (or is over)
    invited: bool = True  # the client was invited to the round (or the round has no cohort: everyone is)



@dataclass(frozen=True)
class SecureSession:
    """One secure-aggregation session of a round, as the store keeps it (aggregator/store/secure.py)."""

    session: str
    started: float
    snapshot: bytes | None  # the relay's last checkpoint (msgpack; no vector); None once the round closed
    outcome: str | None  # None: running; "summed"; "abandoned: <reason>: <detail>"

    @property
    def abandoned(self) -> bool:
        return self.outcome is not None and self.outcome.startswith("abandoned")

"""What the store hands out: checkpoints, spooled updates, receipt rows, an update's standing in its round, and the
broadcast state committed with a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from fedge_contract.packing import Piece

Item = bytes | tuple[Piece, ...]  # a broadcast state item: its bytes (as loaded), or its msgpack pieces (as packed)


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
class BroadcastState:
    """The delta broadcaster's state (aggregator/broadcasting/), as the store keeps it: ``header`` (small,
    every version) and ``items`` (immutable, by key).

    An item's bytes never change once written under its key (``keyframe/<k>``, ``delta/<u>``,
    ``latest/<v>``): the store inserts the keys it does not hold yet and deletes those the header
    no longer names (``header["items"]``).
    """

    version: int
    header: bytes
    items: Mapping[str, Item] = field(default_factory=dict)


def item_bytes(item: Item) -> bytes:
    """An item's bytes in one piece (a loaded item is that already)."""
    return item if isinstance(item, bytes) else b"".join(item)


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

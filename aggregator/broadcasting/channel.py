"""The protocol the Announcer publishes each model version through, whatever reaches devices.

Two channels implement it: ``FullModels`` (full.py: the whole model every version, in
``global_codec``) and ``DeltaBroadcasts`` (deltas.py: each version as a delta from the model
devices hold, issue 16). The coordinator drives either the same way::

    await model.resume(db, initial=channel.initial)     # a new store: version 0 (and its broadcast state)
    await channel.resume(db)                            # a resumed store: the broadcast state of its checkpoint
    channel.bind(conn)
    ...per version:
    prepared = await channel.prepare(true_weights, v)   # off the loop; the model devices will hold, the state
    commit the checkpoint of v with prepared.state      # one store transaction
    await channel.announce(Announced(round, deadline))  # after the commit: the version goes out (bytes per device)

``Announced`` holds what the round says about the version it announces; the weights, the task and
the version come from the model the channel was made for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from aggregator.store import BroadcastState, StoreAccess
from fedge_contract.cohort import Participation
from fedge_contract.mqtt import Connection

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.model import GlobalModel
    from aggregator.observability.fleet import FleetView
    from aggregator.observability.metrics import AggregatorMetrics

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Announced:
    """The round's side of an announcement: which round, until when, whether it is the last, and who takes part."""

    round: int
    deadline: float | None
    final: bool = False
    cohort: Participation | None = None  # the round's participation (fedge_contract.cohort): None, every device trains


@dataclass(frozen=True)
class Prepared:
    """A new version, ready to commit: what devices will hold (None: the true model itself) and the broadcast state."""

    held: Weights | None = None
    state: BroadcastState | None = None


class ModelChannel(Protocol):
    async def initial(self, weights: Weights) -> BroadcastState | None:
        """Version 0 of a new store: the broadcast state to commit with its checkpoint (None: nothing to keep)."""

    async def resume(self, db: StoreAccess) -> None:
        """The model resumed a checkpoint: take up the broadcast state committed with it (or begin afresh)."""

    def bind(self, conn: Connection) -> None:
        """The connection to publish on."""

    async def prepare(self, weights: Weights, version: int) -> Prepared:
        """Version ``version`` of the true model ``weights``, before its checkpoint is committed (whole-model work off the loop)."""

    async def announce(self, announced: Announced) -> int:
        """Publish the current version (a prepared one for the first time, else again); the bytes each device downloads."""

    def lost_retained(self) -> None:
        """The broker may have lost its retained messages (a reconnect): put everything back at the next announcement."""


def model_channel(config: AggregatorConfig, model: GlobalModel, metrics: AggregatorMetrics, fleet: FleetView) -> ModelChannel:
    """The channel ``config`` asks for: delta broadcasts (``broadcast.deltas``, the default) or full models."""
    if config.broadcast.deltas:
        from aggregator.broadcasting.deltas import DeltaBroadcasts

        return DeltaBroadcasts(config, model, metrics, fleet)
    from aggregator.broadcasting.full import FullModels

    return FullModels(config, model, metrics)

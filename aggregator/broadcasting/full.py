"""Full models: the whole model every version, in ``global_codec`` (``--no-delta-broadcasts``).

What every aggregator did before delta broadcasts, and what agents that predate them understand:
a retained GlobalModel on ``global`` per announcement, whole or in chunks above
``max_message_bytes`` (ingest/chunked.py). It is encoded off the loop, a piece at a time (a large
model costs a whole copy, and its codec more). Nothing is kept beside the checkpoint: a restart
re-encodes the checkpoint it resumes.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aggregator.broadcasting.channel import Announced, Prepared, Weights
from aggregator.ingest.chunked import publish_global
from aggregator.store import BroadcastState, StoreAccess
from fedge_contract import GlobalModel, Topics
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import Connection

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.model import GlobalModel as ModelState
    from aggregator.observability.metrics import AggregatorMetrics


class FullModels:
    def __init__(self, config: AggregatorConfig, model: ModelState, metrics: AggregatorMetrics) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        self.model = model
        self.metrics = metrics
        self.chain = parse_chain(config.global_codec)
        self._conn: Connection | None = None

    async def initial(self, weights: Weights) -> BroadcastState | None:
        return None

    async def resume(self, db: StoreAccess) -> None:
        return None

    def bind(self, conn: Connection) -> None:
        self._conn = conn

    async def prepare(self, weights: Weights, version: int) -> Prepared:
        return Prepared()  # devices get the true model (in global_codec): nothing to keep

    def lost_retained(self) -> None:
        return None  # every announcement puts the whole model back anyway

    async def announce(self, announced: Announced) -> int:
        assert self._conn is not None, "bind() the channel first"
        model = self.model
        weights, version, training, fingerprint = model.weights, model.version, model.training, model.spec.fingerprint

        def encode() -> bytearray:
            return GlobalModel(
                fleet=self.config.fleet, model_version=version, round=announced.round, deadline=announced.deadline,
                task=training, fingerprint=fingerprint, tensors=encode_weights(weights, self.chain), final=announced.final,
                cohort=announced.cohort,
            ).to_buffer()  # a piece at a time: a 100 MB model packed at once stalled the loop ~150 ms

        payload = await asyncio.to_thread(encode)
        sent = await publish_global(self._conn, self.topics, version, payload, self.config.ingest.max_message_bytes)
        self.metrics.broadcast_sent(announcement=sent)
        return sent

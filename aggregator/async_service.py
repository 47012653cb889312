"""The aggregator in asynchronous (FedBuff) mode: one open buffer instead of rounds with deadlines.

Same connection, store, validation and ordering of effects as the synchronous service: an
accepted update is spooled before its receipt (the open buffer *is* the spool of round
``version + 1``, re-folded on restart); the new version's checkpoint is committed before it is
published. The admission and weighting rules are in ``aggregator.async_rounds``.

Agents learn the mode from the GlobalModel's task (``extra``: ``mode=async``, ``max_staleness``):
they then keep training when a newer model arrives mid-training and keep outbox entries that are
still within the staleness bound.
"""

from __future__ import annotations

import dataclasses
import logging

from aggregator.async_rounds import AsyncBuffer, open_buffer, scaled, staleness_function
from aggregator.service import Aggregator, Round
from aggregator.validation import decode_delta, parse_update
from fedge_contract import Update

log = logging.getLogger("fedge.aggregator")


class AsyncAggregator(Aggregator):
    """Publishes a new version every ``buffer_size`` accepted updates until ``config.rounds`` versions."""

    async def _serve(self) -> None:
        extra = {**self.training.extra, "mode": "async", "max_staleness": self.config.max_staleness}
        self.training = dataclasses.replace(self.training, extra=extra)
        buffer = self._restored_buffer()
        while not self._done():
            self._open_buffer(buffer)
            await self._announce(buffer)
            while not buffer.full:
                await self._dispatch(await self.conn.messages.get(), buffer)
            await self._close(buffer)
            buffer = buffer.next()
        await self._publish_final()

    def _restored_buffer(self) -> AsyncBuffer:
        """The empty buffer on the current version, with the dedupe window read back from the store."""
        plan = self.config.buffer_plan
        contributed = self.store.contributions(self.version - plan.max_staleness)
        return open_buffer(self.version, plan, staleness_function(self.config.staleness), contributed)

    def _open_buffer(self, buffer: AsyncBuffer) -> None:
        """Start folding into ``buffer``, re-folding what a previous run spooled into it."""
        self._sum = self.defence.collector(self.spec)
        self.store.open_round(buffer.number, buffer.base_version, None)
        for spooled in self.store.spooled(buffer.number):
            update = parse_update(spooled.payload, topic_client=spooled.client_id, fleet=self.config.fleet, limits=self.limits)
            factor = buffer.staleness(buffer.base_version - update.base_version)
            delta, weight = self.defence.check(decode_delta(update, self.spec), update.num_samples, strict=False)
            self._sum.add(scaled(delta, factor), weight)
            self._record(buffer, update)
        if buffer.accepted:
            log.info("buffer for v%d: re-folded %d spooled updates", buffer.number, buffer.accepted)

    def _admit(self, update: Update, rnd: Round) -> float:
        assert isinstance(rnd, AsyncBuffer)
        return rnd.admit(update, self.store.is_accepted)

    def _record(self, rnd: Round, update: Update) -> None:
        assert isinstance(rnd, AsyncBuffer)
        rnd.record(update.client_id, update.update_id, update.base_version)

    def _round_metrics(self, rnd: Round) -> dict[str, float]:
        assert isinstance(rnd, AsyncBuffer)
        return {"staleness_mean": rnd.staleness_sum / max(rnd.accepted, 1), "staleness_max": float(rnd.staleness_max)}

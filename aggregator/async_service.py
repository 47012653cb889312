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
from dataclasses import dataclass

from aggregator.async_rounds import AsyncBuffer, open_buffer, staleness_function
from aggregator.ingest import Admission
from aggregator.service import Aggregator, Round
from aggregator.store import Store
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
        self.ingest.reset()
        self.store.open_round(buffer.number, buffer.base_version, None)
        for update in self.ingest.refold(self.store.spooled(buffer.number), lambda u: buffer.staleness(buffer.base_version - u.base_version)):
            self._record(buffer, update)
        if buffer.accepted:
            log.info("buffer for v%d: re-folded %d spooled updates", buffer.number, buffer.accepted)

    def _admission(self, rnd: Round) -> Admission:
        assert isinstance(rnd, AsyncBuffer)
        return BufferAdmission(self.store, rnd)

    def _record(self, rnd: Round, update: Update) -> None:
        assert isinstance(rnd, AsyncBuffer)
        rnd.record(update.client_id, update.update_id, update.base_version)

    def _round_metrics(self, rnd: Round) -> dict[str, float]:
        assert isinstance(rnd, AsyncBuffer)
        return {"staleness_mean": rnd.staleness_sum / max(rnd.accepted, 1), "staleness_max": float(rnd.staleness_max)}


@dataclass(frozen=True)
class BufferAdmission:
    """Async mode admits in memory (the buffer's staleness window, one process) and spools to the store."""

    store: Store
    buffer: AsyncBuffer

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

"""The aggregator with ingest workers (``fedge aggregator --workers N``): the coordinator.

Decoding and folding updates is the aggregator's CPU-bound part; rounds, the model and the
store's decisions are not. So the coordinator keeps everything a single aggregator does except
reading updates: it owns the rounds (opening, deadline, target, closing), the announcements,
RoundStatus, strategy, evaluation and checkpoints, and subscribes only to presence. N worker
processes (aggregator/worker.py) share the fleet's updates through an MQTT 5 shared subscription
and each runs the aggregator's own update path into a partial sum (aggregator/ingest.py).

Consistency rests on the store, the one ledger every process writes: an update is admitted by a
transaction that sees the round's count, the update id and the client (so dedupe and the target
hold across workers), and names the worker (``shard``) that folded it. Closing a round:

1. mark it closing in the store: from that commit on, no worker admits into it;
2. send ``close`` to the workers that had it open, and merge each one's partial sum (the fold is
   associative; float64 sums) into the coordinator's own partial, which holds the updates
   re-folded from the spool after a restart or from workers that died;
3. check that the merged update ids are exactly the ids the store accepted, else stop loudly
   (a restart re-folds the round from the spool);
4. strategy, checkpoint, publish: as the single aggregator does.

Faults: a worker that exits mid-round (killed, crashed) has its spooled updates of the round
re-folded here before it is started again (same client id: it drains its queued session), and the
round is re-announced so that agents resend what that worker had taken off the broker but not
answered. A coordinator that dies leaves workers that see end of file on their stdin and exit; a
new coordinator takes a new epoch in the store, so a straggling old worker can no longer admit
anything, re-folds the whole spool (as a single aggregator does) and starts fresh workers.

Not every aggregation splits into partial sums: AggregatorConfig refuses ``--workers`` with async
mode, robust rules (median, trimmed mean, Krum) and the adaptive norm bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.defence import Collector
from aggregator.errors import LedgerMismatch, WorkerFailed
from aggregator.rounds import OpenRound
from aggregator.service import Aggregator, Round
from aggregator.shards import WorkerEvent, WorkerPool
from fedge_contract import ReceiptStatus
from fedge_contract.aio import cancel_and_wait

log = logging.getLogger("fedge.aggregator")

CLOSE_TIMEOUT = 60.0  # seconds a worker has to answer ``close`` with its partial sum before it is killed
MAX_RESPAWN_DELAY = 10.0


@dataclass
class _WorkerState:
    ready: bool = False  # connected and subscribed; gets ``open`` frames
    round: int | None = None  # the round it has open (a partial sum is owed for it)
    failures: int = 0  # exits since its last partial sum (backoff of its restarts)


def _log_settings() -> dict[str, Any]:
    """This process's logging (level, file, JSON), for the workers to log alike."""
    root = logging.getLogger()
    files = [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]
    json = any(type(h.formatter).__name__ == "JsonFormatter" for h in root.handlers)
    return {"level": logging.getLevelName(root.getEffectiveLevel()).lower(), "file": files[0] if files else None, "json": json}


class ShardedAggregator(Aggregator):
    """An Aggregator whose updates are ingested by ``config.workers`` worker processes."""

    sharded = True

    def __init__(self, config: AggregatorConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.events: asyncio.Queue[Any] = asyncio.Queue()  # MQTT messages (presence) and WorkerEvents
        self.workers = {i: _WorkerState() for i in range(config.workers)}
        self.worker_exits = 0
        self._current: OpenRound | None = None  # the round being collected or closed
        self._closing = False
        self._open_frame: dict[str, Any] | None = None  # what a worker that becomes ready is told

    # ------------------------------------------------------------------ start
    def _subscriptions(self) -> list[str]:
        return [self.topics.all_presence]  # updates go to the workers' shared subscription

    def _inbox_limit(self) -> int | None:
        return None  # presence only: the workers hold back the updates

    def _idle(self) -> bool:
        return self.events.empty()

    async def _start_ingest(self, stack: contextlib.AsyncExitStack) -> None:
        pump = asyncio.create_task(self._pump(), name="coordinator-messages")
        stack.push_async_callback(cancel_and_wait, [pump])
        self.pool = await stack.enter_async_context(WorkerPool(self.config.workers, self._setup, self.events))
        while not all(w.ready for w in self.workers.values()):
            await self._handle_event(await self.events.get(), None)
        log.info("%d ingest workers ready on %s", self.config.workers, self.topics.all_updates)

    async def _pump(self) -> None:
        while True:
            self.events.put_nowait(await self.conn.messages.get())

    def _setup(self, index: int) -> dict[str, Any]:
        return {
            "kind": "setup", "index": index, "epoch": self.epoch, "config": self.config.to_wire(),
            "spec": [[t.name, list(t.shape), t.dtype] for t in self.spec.tensors], "log": _log_settings(),
        }

    # ------------------------------------------------------------------ rounds
    def _open_round(self) -> OpenRound:
        rnd = super()._open_round()
        self._current, self._closing = rnd, False
        self._open_frame = {"kind": "open", "round": rnd.number, "base_version": rnd.base_version, "target": rnd.plan.target,
                            "deadline": rnd.deadline}
        for index, state in self.workers.items():
            if state.ready and self.pool.send(index, self._open_frame):
                state.round = rnd.number
        return rnd

    async def _next_event(self) -> Any:
        return await self.events.get()

    async def _handle_event(self, event: Any, rnd: OpenRound | None) -> None:
        if isinstance(event, WorkerEvent):
            await self._on_worker(event)
        else:
            await self._dispatch(event, rnd)  # type: ignore[arg-type]
        self._status_if_due(self._current)

    async def _on_update(self, client: str, payload: bytes, rnd: Round) -> None:
        # Only a session left from a run without workers still has updates/+: the workers got this one too.
        log.debug("ignored an update of %s on the coordinator's own subscription", client)

    async def _gather(self, rnd: Round) -> Collector:
        assert isinstance(rnd, OpenRound)
        number = rnd.number
        self._closing, self._open_frame = True, None
        self.store.mark_closing(number)
        for index, state in self.workers.items():
            if state.round == number:
                self.pool.send(index, {"kind": "close", "round": number})  # a dead one's exit event re-folds instead
        await self._until(lambda: not any(s.round == number for s in self.workers.values()), on_timeout=self._kill_owing)
        self.ingest.check_ledger(number)
        if rnd.accepted != len(self.ingest.folded):
            raise LedgerMismatch(f"round {number}: {rnd.accepted} updates reported accepted, {len(self.ingest.folded)} folded")
        shares = {("here" if shard is None else f"w{shard}"): n for shard, n in sorted(self.store.accepted_by_shard(number).items(),
                                                                                      key=lambda kv: -1 if kv[0] is None else kv[0])}
        log.info("round %d: merged the partial sums of %d updates (%s)", number, rnd.accepted,
                 " ".join(f"{k}={v}" for k, v in shares.items()) or "none")
        return self.ingest.collector

    async def _until(self, done: Callable[[], bool], *, on_timeout: Callable[[], None]) -> None:
        """Handle events until ``done()``; ``on_timeout`` after CLOSE_TIMEOUT seconds without it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_TIMEOUT
        while not done():
            try:
                async with asyncio.timeout_at(deadline):
                    event = await self.events.get()
            except TimeoutError:
                on_timeout()
                deadline = loop.time() + CLOSE_TIMEOUT
                continue
            await self._handle_event(event, self._current)

    def _kill_owing(self) -> None:
        for index, state in self.workers.items():
            if state.round is not None:
                log.error("ingest worker %d sent no partial sum for round %d within %.0fs: killing it", index, state.round, CLOSE_TIMEOUT)
                self.pool.kill(index)  # its exit event re-folds its spooled updates

    # ------------------------------------------------------------------ worker events
    async def _on_worker(self, event: WorkerEvent) -> None:
        state = self.workers[event.index]
        frame = event.frame
        if frame is None:
            await self._on_exit(event.index, event.returncode)
            return
        kind = frame.get("kind")
        current = self._current
        if kind == "receipt":
            self._count_receipt(ReceiptStatus(frame["status"]), str(frame["reason"]), int(frame["nbytes"]))
        elif kind == "accepted":
            if current is not None and frame["round"] == current.number:
                current.record(str(frame["client"]), str(frame["update_id"]))
                self._status_dirty = True
        elif kind == "partial":
            if current is None or frame["round"] != current.number or state.round != current.number:
                raise LedgerMismatch(f"ingest worker {event.index} sent a partial sum for round {frame['round']}, which it did not have open")
            self.ingest.merge(frame)
            state.round, state.failures = None, 0
        elif kind == "ready":
            state.ready = True
            if self._open_frame is not None and self.pool.send(event.index, self._open_frame):
                state.round = self._open_frame["round"]
        else:
            log.warning("ingest worker %d sent an unknown frame %r", event.index, kind)

    async def _on_exit(self, index: int, code: int | None) -> None:
        state = self.workers[index]
        if not state.ready and state.failures == 0 and self._current is None:
            raise WorkerFailed(f"ingest worker {index} exited with code {code} before it was ready: see its log lines above")
        state.ready, state.round = False, None
        state.failures += 1
        self.worker_exits += 1
        current = self._current
        refolded = []
        if current is not None:  # before the restart: the new process will spool under the same shard
            refolded = self.ingest.refold(self.store.spooled(current.number, shard=index))
            for update in refolded:
                current.record(update.client_id, update.update_id)
        delay = 0.0 if state.failures == 1 else min(MAX_RESPAWN_DELAY, 0.5 * 2 ** (state.failures - 2))
        log.warning("ingest worker %d exited (code %s): re-folded %d of its updates%s; restarting it in %.1fs", index, code,
                    len(refolded), f" of round {current.number}" if current else "", delay)
        self.pool.respawn(index, delay)
        if current is not None and not self._closing:
            # updates it had taken off the broker but not answered: agents resend on a re-announcement
            await self._announce(current)

"""Ingest by worker processes (``fedge aggregator --workers N``): the coordinator's side.

Decoding and folding updates is the aggregator's CPU-bound part; rounds, the model and the
store's decisions are not. So the coordinator keeps everything except reading updates, and N
worker processes (process.py) share the fleet's updates through an MQTT 5 shared subscription,
each running the aggregator's own ingest path into a partial sum (aggregator/ingest/pipeline.py).
The coordinator's connection subscribes to presence only.

Consistency rests on the store, the one ledger every process writes: an update is admitted by a
transaction that sees the round's count, the update id and the client (so dedupe and the target
hold across workers), and names the worker (``shard``) that folded it. Gathering a round:

1. mark it closing in the store: from that commit on, no worker admits into it;
2. send ``close`` to the workers that had it open, and merge each one's partial sum (the fold is
   associative; float64 sums) into the coordinator's own partial, which holds the updates
   re-folded from the spool after a restart or from workers that died;
3. check that the merged update ids are exactly the ids the store accepted, else stop loudly
   (a restart re-folds the round from the spool).

Faults: a worker that exits mid-round (killed, crashed) has its spooled updates of the round
re-folded here before it is started again (same client id: it drains its queued session), and the
round is re-announced so that agents resend what that worker had taken off the broker but not
answered. A coordinator that dies leaves workers that see end of file on their stdin and exit; a
new coordinator takes a new epoch in the store, so a straggling old worker can no longer admit
anything, re-folds the whole spool (as a single aggregator does) and starts fresh workers.

Not every aggregation splits into partial sums: the config refuses ``--workers`` with async mode,
robust rules (median, trimmed mean, Krum) and the adaptive norm bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import aiomqtt

from aggregator.aggregation.defence import Collector
from aggregator.config import AggregatorConfig
from aggregator.errors import LedgerMismatch, WorkerFailed
from aggregator.ingest.pipeline import Answered, Ingest
from aggregator.ingest.source import OnMessage, Outcome, refold
from aggregator.rounds.policy import Accepted, Round
from aggregator.store import Store, StoreAccess, call
from aggregator.workers.pool import WorkerEvent, WorkerPool
from fedge_contract import ReceiptStatus
from fedge_contract.aio import cancel_and_wait
from fedge_contract.mqtt import Connection
from fedge_contract.tensors import ModelSpec

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


class WorkerIngest:
    """N worker processes ingest; this coordinator merges their partial sums (see the module docstring)."""

    def __init__(self, config: AggregatorConfig, ingest: Ingest, db: StoreAccess, spec: ModelSpec, *, answered: Answered) -> None:
        self.config = config
        self.ingest = ingest  # the coordinator's own partial sum: re-folded updates, merged partials
        self.db = db
        self.spec = spec
        self.answered = answered
        self.events: asyncio.Queue[Any] = asyncio.Queue()  # MQTT messages (presence) and WorkerEvents
        self.workers = {i: _WorkerState() for i in range(config.ingest.workers)}
        self.exits = 0  # worker processes that exited while the aggregator ran
        self._conn: Connection | None = None
        self._epoch: int | None = None
        self._pool: WorkerPool | None = None
        self._running = contextlib.AsyncExitStack()  # the pool and the pump, left in reverse order
        self._current: Round | None = None  # the round being collected or gathered
        self._closing = False
        self._open_frame: dict[str, Any] | None = None  # what a worker that becomes ready is told

    @property
    def subscriptions(self) -> list[str]:
        return []  # updates go to the workers' shared subscription

    @property
    def inbox_limit(self) -> int | None:
        return None  # presence only: the workers hold back the updates

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            raise RuntimeError("the ingest workers are not running")
        return self._pool

    def bind(self, conn: Connection, epoch: int | None) -> None:
        self._conn, self._epoch = conn, epoch

    async def __aenter__(self) -> Self:
        """Start the workers and the pump of the coordinator's own messages; return once every worker is ready."""
        assert self._conn is not None
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.ingest.close)
            pump = asyncio.create_task(self._pump_messages(self._conn), name="coordinator-messages")
            stack.push_async_callback(cancel_and_wait, [pump])
            self._pool = await stack.enter_async_context(WorkerPool(self.config.ingest.workers, self._setup, self.events))
            held: list[Any] = []  # the coordinator's own messages meanwhile (the fleet's retained presence): kept, in order
            while not all(w.ready for w in self.workers.values()):
                event = await self.events.get()
                if isinstance(event, WorkerEvent):
                    await self._on_worker(event)
                else:
                    held.append(event)
            while not self.events.empty():
                held.append(self.events.get_nowait())
            for event in held:
                self.events.put_nowait(event)
            self._running = stack.pop_all()
        log.info("%d ingest workers ready on %s", self.config.ingest.workers, self.ingest.topics.all_updates)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the workers (asked, then killed), the pump and the coordinator's receipts."""
        try:
            await self._running.aclose()
        finally:
            self._pool = None

    async def _pump_messages(self, conn: Connection) -> None:
        while True:
            self.events.put_nowait(await conn.messages.get())

    def _setup(self, index: int) -> dict[str, Any]:
        return {
            "kind": "setup", "index": index, "epoch": self._epoch, "config": self.config.to_wire(),
            "spec": [[t.name, list(t.shape), t.dtype] for t in self.spec.tensors], "log": _log_settings(),
        }

    # ------------------------------------------------------------------ IngestSource
    async def next_event(self) -> Any:
        return await self.events.get()

    def idle(self) -> bool:
        return self.events.empty()

    async def open(self, rnd: Round) -> list[Accepted]:
        self.ingest.reset()
        refolded = await refold(self.ingest, self.db, rnd)
        self._current, self._closing = rnd, False
        self._open_frame = {"kind": "open", "round": rnd.number, "base_version": rnd.base_version, "target": rnd.target,
                            "deadline": rnd.deadline}
        for index, state in self.workers.items():
            if state.ready and self.pool.send(index, self._open_frame):
                state.round = rnd.number
        return refolded

    async def handle(self, event: Any, rnd: Round | None) -> Outcome:
        if isinstance(event, WorkerEvent):
            return await self._on_worker(event)
        if isinstance(event, aiomqtt.Message):  # only a session left from a run without workers still has updates/+
            log.debug("ignored %s on the coordinator's own subscription: the workers got it too", event.topic)
        return Outcome()

    async def drain(self) -> None:
        await self.ingest.drain()  # the workers send their own receipts; the coordinator's partial sends none

    async def gather(self, rnd: Round, on_message: OnMessage) -> Collector:
        number = rnd.number
        self._closing, self._open_frame = True, None
        await call(self.db, Store.mark_closing, number)
        for index, state in self.workers.items():
            if state.round == number:
                self.pool.send(index, {"kind": "close", "round": number})  # a dead one's exit event re-folds instead
        await self._until(rnd, lambda: not any(s.round == number for s in self.workers.values()), on_message)
        await self.ingest.check_ledger(number)
        shards = await call(self.db, Store.accepted_by_shard, number)
        shares = {("here" if shard is None else f"w{shard}"): n for shard, n in sorted(shards.items(), key=lambda kv: -1 if kv[0] is None else kv[0])}
        log.info("round %d: merged the partial sums of %d updates (%s)", number, rnd.accepted,
                 " ".join(f"{k}={v}" for k, v in shares.items()) or "none")
        self._current = None
        return self.ingest.collector

    def counted(self) -> int:
        return len(self.ingest.folded)

    # ------------------------------------------------------------------ worker events
    async def _until(self, rnd: Round, done: Callable[[], bool], on_message: OnMessage) -> None:
        """Handle events until ``done()``; kill the workers that owe a partial sum after CLOSE_TIMEOUT without it.

        Admissions reported late (before the round was marked closing) and re-folds of a worker that
        died meanwhile still count into ``rnd``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_TIMEOUT
        while not done():
            try:
                async with asyncio.timeout_at(deadline):
                    event = await self.events.get()
            except TimeoutError:
                self._kill_owing()
                deadline = loop.time() + CLOSE_TIMEOUT
                continue
            if isinstance(event, WorkerEvent):
                for accepted in (await self._on_worker(event)).accepted:
                    rnd.record(accepted)
            else:
                await on_message(event)

    def _kill_owing(self) -> None:
        for index, state in self.workers.items():
            if state.round is not None:
                log.error("ingest worker %d sent no partial sum for round %d within %.0fs: killing it", index, state.round, CLOSE_TIMEOUT)
                self.pool.kill(index)  # its exit event re-folds its spooled updates

    async def _on_worker(self, event: WorkerEvent) -> Outcome:
        state = self.workers[event.index]
        frame = event.frame
        if frame is None:
            return await self._on_exit(event.index, event.returncode)
        kind = frame.get("kind")
        current = self._current
        outcome = Outcome()
        if kind == "receipt":
            self.answered(ReceiptStatus(frame["status"]), str(frame["reason"]), int(frame["nbytes"]))
        elif kind == "accepted":
            if current is not None and frame["round"] == current.number:
                outcome.accepted.append(Accepted(str(frame["client"]), str(frame["update_id"]), int(frame["base_version"])))
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
        return outcome

    async def _on_exit(self, index: int, code: int | None) -> Outcome:
        state = self.workers[index]
        if not state.ready and state.failures == 0 and self._current is None:
            raise WorkerFailed(f"ingest worker {index} exited with code {code} before it was ready: see its log lines above")
        state.ready, state.round = False, None
        state.failures += 1
        self.exits += 1
        current = self._current
        outcome = Outcome()
        if current is not None:  # before the restart: the new process will spool under the same shard
            outcome.accepted = await refold(self.ingest, self.db, current, shard=index)
        delay = 0.0 if state.failures == 1 else min(MAX_RESPAWN_DELAY, 0.5 * 2 ** (state.failures - 2))
        log.warning("ingest worker %d exited (code %s): re-folded %d of its updates%s; restarting it in %.1fs", index, code,
                    len(outcome.accepted), f" of round {current.number}" if current else "", delay)
        self.pool.respawn(index, delay)
        # updates it had taken off the broker but not answered: agents resend on a re-announcement
        outcome.reannounce = current is not None and not self._closing
        return outcome

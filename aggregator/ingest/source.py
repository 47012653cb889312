"""Where a coordinator's updates are validated and folded: its own connection, or worker processes.

The coordinator (aggregator/coordinator.py) runs one loop for both; an ``IngestSource`` is what
differs. ``LocalIngest`` (here) takes updates off the coordinator's own connection and runs the
ingest path (pipeline.py) in this process; ``WorkerIngest`` (aggregator/workers/source.py)
leaves them to N processes on a shared subscription and merges their partial sums.

What the coordinator's connection delivers is either the fleet's presence (the coordinator's own
concern), or the source's traffic: ``next_event`` yields both, in arrival order, and the
coordinator hands the source what is not presence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import aiomqtt

from aggregator.aggregation.defence import Collector
from aggregator.ingest.chunked import Assembled, ChunkedUpdates
from aggregator.ingest.pipeline import Ingest
from aggregator.rounds.policy import Accepted, Round
from aggregator.store import Store, StoreAccess, call
from fedge_contract import ReceiptStatus, Topics
from fedge_contract.mqtt import Connection

OnMessage = Callable[[aiomqtt.Message], Awaitable[None]]  # a message the source does not own (presence), back to the coordinator


@dataclass
class Outcome:
    """What handling one event changed: updates admitted, and whether agents must be asked to resend."""

    accepted: list[Accepted] = field(default_factory=list)
    reannounce: bool = False  # updates may have been taken off the broker and lost (a worker died)


class IngestSource(Protocol):
    """The way updates reach the open round. Entered (``async with``) after the coordinator's connection."""

    @property
    def subscriptions(self) -> list[str]:
        """Topics the coordinator's connection subscribes to for this source."""

    @property
    def inbox_limit(self) -> int | None:
        """Messages the coordinator's connection buffers before it stops reading (None: no bound)."""

    def bind(self, conn: Connection, epoch: int | None) -> None:
        """The coordinator's connection (made after ``subscriptions`` was read) and its hold on the store."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def next_event(self) -> Any:
        """The next thing to handle: an MQTT message (presence, an update...) or a source event."""

    def idle(self) -> bool:
        """Nothing else is waiting right now (the end of a burst)."""

    async def open(self, rnd: Round) -> list[Accepted]:
        """A new round: start a new partial sum with what the store already holds of it (a restart)."""

    async def handle(self, event: Any, rnd: Round | None) -> Outcome:
        """One event that is not presence; ``rnd`` is the round being collected (None between rounds)."""

    async def drain(self) -> None:
        """Every receipt decided so far is out (handed to the connection)."""

    async def gather(self, rnd: Round, on_message: OnMessage) -> Collector:
        """The round's complete sum, checked against the store's ledger; ``on_message`` takes the
        presence that arrives meanwhile."""

    def counted(self) -> int:
        """Updates folded into the round's sum so far."""


class LocalIngest:
    """Updates arrive on this process's own connection (``fl/<fleet>/updates/+``, or an ingest worker's shared
    subscription) and are ingested here."""

    def __init__(self, ingest: Ingest, db: StoreAccess, topics: Topics, *, inbox_limit: int, chunk_timeout: float,
                 shard: int | None = None) -> None:
        self.ingest = ingest
        self.shard = shard  # the ingest worker this runs in (None: the aggregator itself)
        self.db = db
        self.topics = topics
        self._inbox_limit = inbox_limit
        self._chunk_timeout = chunk_timeout
        self._conn: Connection | None = None
        self._chunked: ChunkedUpdates | None = None  # large updates in chunks (ingest/chunked.py), made on first use
        self._epoch: int | None = None

    @property
    def subscriptions(self) -> list[str]:
        return [self.topics.all_updates]

    @property
    def inbox_limit(self) -> int | None:
        return self._inbox_limit

    def bind(self, conn: Connection, epoch: int | None) -> None:
        """The coordinator's connection, once made, and its hold on the store."""
        self._conn, self._epoch = conn, epoch

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ingest.close()  # no release timer, no receipt after the connection closes

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("LocalIngest is not bound to a connection")
        return self._conn

    async def next_event(self) -> aiomqtt.Message:
        return await self.conn.messages.get()

    def idle(self) -> bool:
        return self.conn.messages.empty()

    async def open(self, rnd: Round) -> list[Accepted]:
        self.ingest.reset()
        return await refold(self.ingest, self.db, rnd)

    async def handle(self, event: Any, rnd: Round | None) -> Outcome:
        message: aiomqtt.Message = event
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else bytes(str(message.payload or ""), "utf-8")
        outcome = Outcome()
        if rnd is None:
            return outcome  # between rounds nothing is read: only a gather hands us messages, and it owns none of them
        if self._chunks().claims(topic, payload):
            for done in await self._chunks().handle(self.conn, topic, payload, max_bytes=self.ingest.limits.max_bytes):
                if isinstance(done, Assembled):
                    await self._update(done.client, done.payload, rnd, outcome)
                else:
                    self.ingest.receipt(done.client, done.update_id, ReceiptStatus.REJECTED, done.reason,
                                        rnd.admission(self.db.store, shard=self.shard, epoch=self._epoch), done.nbytes)
        elif (client := self.topics.client_of(topic)) is not None and topic == self.topics.update(client):
            await self._update(client, payload, rnd, outcome)
        if self.ingest.due():
            self.ingest.release()
        return outcome

    async def _update(self, client: str, payload: bytes, rnd: Round, outcome: Outcome) -> None:
        update = await self.ingest.handle(client, payload, rnd.admission(self.db.store, shard=self.shard, epoch=self._epoch))
        if update is not None:
            outcome.accepted.append(Accepted.of(update))

    def _chunks(self) -> ChunkedUpdates:
        if self._chunked is None:
            self._chunked = ChunkedUpdates(self.topics, timeout=self._chunk_timeout)
        return self._chunked

    async def drain(self) -> None:
        await self.ingest.drain()

    async def gather(self, rnd: Round, on_message: OnMessage) -> Collector:
        await self.ingest.check_ledger(rnd.number)
        return self.ingest.collector

    def counted(self) -> int:
        return len(self.ingest.folded)


async def refold(ingest: Ingest, db: StoreAccess, rnd: Round, shard: int | None = None) -> list[Accepted]:
    """Fold what the store holds of ``rnd`` and ``ingest`` has not folded yet (a restart mid-round, or a worker
    that died: ``shard``). Reading and decoding run off the loop: a round may hold gigabytes."""
    spooled = await call(db, Store.spooled, rnd.number, shard=shard)
    if not spooled:
        return []
    updates = await asyncio.to_thread(ingest.refold, spooled, lambda update: rnd.factor(Accepted.of(update)))
    return [Accepted.of(update) for update in updates]

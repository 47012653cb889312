"""Large messages on the aggregator's side: chunked updates in, a chunked global model out.

An agent whose update exceeds its ``max_message_bytes`` publishes the chunks retained on
``updates/<client>/<update_id>/<i>`` and a manifest on ``updates/<client>`` (fedge_contract/chunks.py).
``ChunkedUpdates`` reassembles them inside the aggregator's one message loop; the service hands
each complete payload to its ordinary update path (same strict decoding, dedupe, spool, receipt)
and answers each failure with a ``rejected`` receipt (``bad_chunk``, ``incomplete``, or the
manifest's decode error). Because the chunks are retained, whichever process receives the
manifest (one of several workers behind a shared subscription) fetches them itself: this class
needs nothing but its own connection and can serve in any worker's loop.

``publish_global`` is the other direction: the global model above ``max_message_bytes`` goes out
as retained chunks on ``global/<version>/<i>`` plus a retained manifest on ``global``; the
previous version's chunks are cleared once the new version is out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedge_contract.chunks import ChunkLimits, Manifest, is_manifest
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.mqtt import Connection
from fedge_contract.topics import Topics
from fedge_contract.transfer import ChunkReceiver, Received, clear_chunks, send_chunked

log = logging.getLogger("fedge.aggregator")


@dataclass(frozen=True)
class Assembled:
    """A chunked update arrived whole: ``payload`` goes to the ordinary update path."""

    client: str
    payload: bytes


@dataclass(frozen=True)
class Refused:
    """A chunked update that will not be used: answer it with a ``rejected`` receipt."""

    client: str
    update_id: str | None
    reason: str  # "<reason code>: <detail>"
    nbytes: int


class ChunkedUpdates:
    """Reassembles chunked updates for one fleet; see the module docstring.

    Limits: an update's declared size must fit the aggregator's update limit (``max_bytes``, given
    with each message since it is known only once the model is built); at most ``max_concurrent``
    updates and ``max_inflight_bytes`` of declared size are fetched at once (further manifests wait
    in line: their chunks stay retained meanwhile); a partial set with no new chunk for ``timeout``
    seconds is dropped and answered ``incomplete``.
    """

    def __init__(
        self,
        topics: Topics,
        *,
        timeout: float = 60.0,
        max_concurrent: int = 8,
        max_inflight_bytes: int = 512 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.timeout = timeout
        self.max_concurrent = max_concurrent
        self.max_inflight_bytes = max_inflight_bytes
        self.clock = clock
        self.receiver: ChunkReceiver | None = None  # made on first use, on the service's connection

    def claims(self, topic: str, payload: bytes) -> bool:
        """Whether a message is chunk traffic: a chunk, a timer wake-up, or a manifest on ``updates/<client>``."""
        if self.topics.chunk_of(topic) is not None or (self.receiver is not None and self.receiver.owns(topic)):
            return True
        client = self.topics.client_of(topic)
        return client is not None and topic == self.topics.update(client) and is_manifest(payload)

    async def handle(self, conn: Connection, topic: str, payload: bytes, *, max_bytes: int) -> list[Assembled | Refused]:
        """Take one claimed message; the updates it completed or refused (usually none yet)."""
        receiver = self._receiver(conn, max_bytes)
        client = self.topics.client_of(topic)
        if client is not None:  # a manifest on updates/<client>
            refused = await self._offer(receiver, client, payload, max_bytes)
            return [refused] if refused else []
        done: list[Assembled | Refused] = []
        for outcome in await receiver.handle(topic, payload):
            manifest = outcome.manifest
            assert manifest.client_id is not None
            if isinstance(outcome, Received):
                done.append(Assembled(manifest.client_id, outcome.payload))
            else:
                log.warning("chunked update refused: %s", outcome.error)
                done.append(Refused(manifest.client_id, manifest.update_id, str(outcome.error), outcome.received))
        return done

    async def _offer(self, receiver: ChunkReceiver, client: str, payload: bytes, max_bytes: int) -> Refused | None:
        try:
            manifest = Manifest.from_bytes(payload, max_size=max_bytes, fleet=self.topics.fleet)
            if manifest.kind != "update":
                raise DecodeError(Reason.BAD_VALUE, f"a {manifest.kind} manifest on an update topic")
            if manifest.client_id != client:
                raise DecodeError(Reason.CLIENT_MISMATCH, f"manifest says client {manifest.client_id!r} but was published on {client!r}'s topic")
            log.info("fetching %s", manifest.describe(), extra={"client": client, "update": manifest.update_id})
            await receiver.offer(manifest)
        except DecodeError as exc:
            return Refused(client, Manifest.peek_update_id(payload), str(exc), len(payload))
        return None

    def _receiver(self, conn: Connection, max_bytes: int) -> ChunkReceiver:
        if self.receiver is None or self.receiver.conn is not conn:
            limits = ChunkLimits(max_size=max_bytes, max_concurrent=self.max_concurrent, max_inflight_bytes=self.max_inflight_bytes,
                                 timeout=self.timeout)
            self.receiver = ChunkReceiver(conn, self.topics, limits, bad_chunk="fail", clear=True, clock=self.clock)
        return self.receiver


async def publish_global(conn: Connection, topics: Topics, version: int, payload: bytes | bytearray, max_message_bytes: int) -> None:
    """Publish the global model (retained): whole up to ``max_message_bytes``, else in chunks.

    After a chunked version is out, the previous version's chunks are cleared. The previous set is
    not remembered (a restarted aggregator could not know it): the model's architecture is fixed,
    so it had the same number of chunks, give or take one at a boundary, and clearing topics that
    hold nothing costs one small publish each.
    """
    if len(payload) <= max_message_bytes:
        await conn.publish(topics.global_model, bytes(payload), retain=True)
        return
    # hashing every chunk and the whole of a large model takes long: off the event loop
    manifest = await asyncio.to_thread(Manifest.of, payload, fleet=topics.fleet, kind="global", chunk_size=max_message_bytes,
                                       model_version=version)
    await send_chunked(conn, topics, manifest, payload, topic=topics.global_model, retain=True)
    log.info("published global model v%d in %d chunks of %d bytes", version, manifest.count, manifest.chunk_size)
    if version > 0:
        await clear_chunks(conn, topics.global_chunks(version - 1), manifest.count + 1)

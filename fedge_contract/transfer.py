"""Large messages over a fedge Connection: publish chunks and a manifest, fetch and reassemble them.

The rules (manifest, hashes, limits) are in chunks.py; this module does the MQTT side.

Sender: ``send_chunked`` publishes every chunk retained on ``<base>/<i>``, then the manifest on
the message's own topic. Both go QoS 1 over one connection, so the broker has stored every chunk
before it routes the manifest: whoever sees the manifest finds the chunks. ``clear_chunks``
empties the chunk topics again once they are no longer needed.

Receiver: a ChunkReceiver lives inside its owner's message loop and has no task of its own.
``offer(manifest)`` subscribes to ``<base>/+`` (the broker then sends the retained chunks); the
owner hands it every message on a chunk topic and gets back the payloads that completed and the
messages that failed. When a partial set stalls, a timer puts a marker message (``WAKE_TOPIC``)
into the connection's queue, so expiry too is handled by the one task that owns the state.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiomqtt

from fedge_contract.chunks import Busy, ChunkLimits, Manifest, Reassembler
from fedge_contract.errors import DecodeError
from fedge_contract.mqtt import Connection
from fedge_contract.topics import Topics

log = logging.getLogger("fedge.chunks")

# Topics starting with '$' never match a subscription that starts with a wildcard or 'fl/', so the
# broker can never deliver this one: only a ChunkReceiver's timer puts it in the queue.
WAKE_TOPIC = "$fedge/chunks/expired"


def chunk_base(topics: Topics, manifest: Manifest) -> str:
    """The topic under which ``manifest``'s chunks are published (``<base>/<index>``)."""
    if manifest.kind == "global":
        assert manifest.model_version is not None
        return topics.global_chunks(manifest.model_version)
    if manifest.kind == "keyframe":
        assert manifest.model_version is not None
        return topics.keyframe_chunks(manifest.model_version)
    if manifest.kind == "delta":
        assert manifest.model_version is not None
        return topics.global_delta(manifest.model_version)
    assert manifest.client_id is not None and manifest.update_id is not None
    return topics.update_chunks(manifest.client_id, manifest.update_id)


async def send_chunked(conn: Connection, topics: Topics, manifest: Manifest, payload: bytes | bytearray, *, topic: str,
                       retain: bool) -> None:
    """Publish ``payload``'s chunks (retained), then ``manifest`` on ``topic``.

    Chunks are cut one at a time, so the sender holds the payload plus one chunk. Republishing
    the same message is idempotent: the same bytes land on the same retained topics.
    """
    base = chunk_base(topics, manifest)
    view = memoryview(payload)
    for index in range(manifest.count):
        start = index * manifest.chunk_size
        await conn.publish(f"{base}/{index}", bytes(view[start : start + manifest.chunk_size]), retain=True)
    await conn.publish(topic, manifest.to_bytes(), retain=retain)


async def clear_chunks(conn: Connection, base: str, count: int) -> None:
    """Empty the retained chunk topics ``<base>/0 .. <base>/<count-1>`` (an empty retained
    message deletes one; deleting one that is not there costs one small publish)."""
    for index in range(count):
        await conn.publish(f"{base}/{index}", b"", retain=True)


@dataclass(frozen=True)
class Received:
    """Every chunk arrived and matched: ``payload`` is the whole message, ready for its decoder."""

    manifest: Manifest
    payload: bytes


@dataclass(frozen=True)
class Refused:
    """A chunked message that will not complete: a bad chunk, or none for ``limits.timeout`` s."""

    manifest: Manifest
    error: DecodeError  # reason BAD_CHUNK or INCOMPLETE
    received: int  # bytes that had arrived


class ChunkReceiver:
    """Fetches and reassembles chunked messages on ``conn``, within ``limits``.

    ``bad_chunk="fail"`` refuses a message at its first bad chunk (an update: its chunks never
    change, so a bad one is a broken or hostile sender); ``"skip"`` drops just that chunk and keeps
    waiting (a global model: the aggregator may be re-announcing the same version, whose new
    chunks replace the old ones just before the new manifest arrives). ``clear=True`` empties the
    chunk topics once a message is done (the aggregator does this for updates; its account can).
    Manifests that find no room (``Busy``) wait in line, up to ``max_waiting``; beyond that they
    are dropped with a warning: their senders publish them again when no receipt comes.
    """

    def __init__(
        self,
        conn: Connection,
        topics: Topics,
        limits: ChunkLimits,
        *,
        bad_chunk: Literal["fail", "skip"] = "fail",
        clear: bool = False,
        max_waiting: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.topics = topics
        self.bad_chunk = bad_chunk
        self.clear = clear
        self.max_waiting = max_waiting
        self.clock = clock
        self.reassembler = Reassembler(limits, clock=clock)
        self._waiting: dict[str, Manifest] = {}  # key -> manifest, in arrival order
        self._done: collections.OrderedDict[str, None] = collections.OrderedDict()  # recently finished keys
        self._timer: asyncio.TimerHandle | None = None

    def owns(self, topic: str) -> bool:
        """Whether ``topic`` is for this receiver: a chunk topic of its fleet, or its wake-up marker."""
        return topic == WAKE_TOPIC or self.topics.chunk_of(topic) is not None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Cancel the wake-up timer (the owner stops reading the queue)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def offer(self, manifest: Manifest) -> None:
        """Start fetching ``manifest``'s chunks, or queue it if the limits leave no room now.

        The same manifest offered again changes nothing; another manifest under the same chunk
        topics (a re-announced model) replaces the one being fetched. Raises DecodeError(TOO_LARGE)
        for a manifest beyond the limits (decode it with the same ``max_size`` to refuse it earlier).
        """
        key = chunk_base(self.topics, manifest)
        self._done.pop(key, None)
        if key in self._waiting:
            self._waiting[key] = manifest
            return
        try:
            started = self.reassembler.start(key, manifest)
        except Busy as exc:
            if len(self._waiting) >= self.max_waiting:
                log.warning("dropped the manifest of %s: %s and %d more wait (its sender will publish it again)",
                            manifest.describe(), exc, len(self._waiting))
            else:
                self._waiting[key] = manifest
            return
        if started:
            # Subscribing (again) makes the broker send the retained chunks, including to a receiver
            # that was already subscribed when a re-announcement replaced them.
            await self.conn.subscribe(f"{key}/+")
        self._arm()

    async def cancel(self, key: str) -> None:
        """Stop fetching (or waiting for) the message whose chunks are under ``key``."""
        manifest = self.reassembler.drop(key) or self._waiting.pop(key, None)
        if manifest is not None:
            await self._finish(key, manifest, clear=False)
        self._arm()

    def keys(self) -> list[str]:
        """Keys (chunk bases) being fetched or waiting."""
        return self.reassembler.keys() + list(self._waiting)

    async def handle(self, topic: str, payload: bytes) -> list[Received | Refused]:
        """Take one message on a chunk topic (or the wake-up marker); what completed or failed."""
        outcomes: list[Received | Refused] = []
        for stalled in self.reassembler.expire():
            await self._finish(stalled.key, stalled.manifest, clear=self.clear)
            outcomes.append(Refused(stalled.manifest, stalled.error, stalled.received))
        ref = self.topics.chunk_of(topic)
        if ref is not None:
            outcome = await self._chunk(ref.base, ref.index, payload)
            if outcome is not None:
                outcomes.append(outcome)
        await self._promote()
        self._arm()
        return outcomes

    async def _chunk(self, key: str, index: int, payload: bytes) -> Received | Refused | None:
        if key not in self.reassembler:
            if key not in self._waiting and key not in self._done:
                # Not ours (any more): a subscription left by an earlier run of this program in its
                # persistent session, or a stray copy. Unsubscribe once so it cannot leak.
                self._remember_done(key)
                await self.conn.unsubscribe(f"{key}/+")
            return None
        if not payload:
            return None  # a chunk topic being cleared (an older set): not a chunk
        manifest = self.reassembler.manifest(key)
        try:
            whole = self.reassembler.add(key, index, payload)
        except DecodeError as exc:
            if self.bad_chunk == "skip" and key in self.reassembler:
                log.info("ignored a chunk that does not match its manifest: %s", exc.detail)
                return None
            received = self.reassembler.received(key) if key in self.reassembler else manifest.size
            self.reassembler.drop(key)
            await self._finish(key, manifest, clear=self.clear)
            return Refused(manifest, exc, received)
        if whole is None:
            return None
        await self._finish(key, manifest, clear=self.clear)
        return Received(manifest, whole)

    async def _finish(self, key: str, manifest: Manifest, *, clear: bool) -> None:
        self._remember_done(key)
        await self.conn.unsubscribe(f"{key}/+")
        if clear:
            await clear_chunks(self.conn, key, manifest.count)

    def _remember_done(self, key: str) -> None:
        self._done[key] = None
        self._done.move_to_end(key)
        while len(self._done) > 1024:
            self._done.popitem(last=False)

    async def _promote(self) -> None:
        """Start waiting manifests, oldest first, while the limits allow."""
        while self._waiting:
            key, manifest = next(iter(self._waiting.items()))
            try:
                self.reassembler.start(key, manifest)
            except Busy:
                return
            del self._waiting[key]
            await self.conn.subscribe(f"{key}/+")

    def _arm(self) -> None:
        """Wake the owner's loop when the earliest partial set would stall."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.reassembler.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self.clock()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self.conn.messages.put_nowait(aiomqtt.Message(WAKE_TOPIC, b"", 0, False, 0, None))

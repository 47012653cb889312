"""The aggregator's publishing side of delta broadcasts (issue 16): each new version onto the broker.

A Broadcaster owns a BroadcastEncoder (fedge_contract.broadcast: server-side error feedback, the
held model, keyframes) and turns each version into retained publishes:

    global/task            the round's TaskConfig (a GlobalTask), when its id changes
    global/key             the keyframe catch-up starts from (a GlobalModel with held_hash)
    global/delta/<v>       the retained copy of delta v, for devices that missed it
    global                 the announcement: a GlobalDelta (a GlobalModel for a reset or a full start)

A message above ``max_message_bytes`` goes as retained chunks plus a manifest (kinds global,
keyframe, delta; fedge_contract.transfer). The order is what makes catch-up safe: the task, the
keyframe and the retained copy are on the broker before the announcement that names them (one
connection, QoS 1, publishes awaited in turn), and what the new version makes obsolete (retired
deltas, the old keyframe's and the previous announcement's chunks) is emptied only after it.

How the coordinator drives it, per version (sync rounds and async versions alike)::

    step, state = await asyncio.to_thread(lambda: (b.advance(true_weights, version), b.state()))  # CPU only
    store: commit the checkpoint of ``version`` and ``state`` in ONE transaction (Store.close_round)
    sent = await b.publish(step, b.about(round, deadline, task))

``advance`` and ``state`` are pure CPU (encode, move held, hash; 0.14 s for 10M parameters), so
they belong off the event loop like the strategy's step; ``publish`` encodes large messages and
hashes their chunks on a worker thread itself. The first version is ``begin`` instead of ``advance``
(a hold for the task's initial model at version 0).

A restarted aggregator rebuilds it with ``Broadcaster.from_state`` from what the store committed
with the checkpoint it resumes (``aggregator/store/broadcast.py`` keeps it), then calls
``republish`` once connected: a crash between the commit and the end of ``publish`` left the broker
with part of a version, and ``republish`` publishes the stored bytes again (stochastic rounding
makes a second encode differ, so it never re-encodes) and empties what the state lists as stale.
``announce`` re-announces the current version (a new deadline, the final model, a reconnect).

Its state (``state()``) is plain values in two parts: a small header (versions, hashes, the task
id, chunk sets to clean) written with every checkpoint, and immutable items (the keyframe, each
retained delta, a latest broadcast that is not retained) that the store writes once and deletes
when the header stops naming them. The held model itself is not stored: ``from_state`` rebuilds it
from the keyframe and the retained deltas, exactly as a device catching up would, and checks its hash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import numpy as np

from aggregator.store.records import BroadcastState, Item, item_bytes
from fedge_contract import TaskConfig, Topics
from fedge_contract.broadcast import (
    Announcement,
    BroadcastEncoder,
    BroadcastPolicy,
    GlobalTask,
    Step,
    task_id,
    worst_case_catch_up_bytes,
)
from fedge_contract.broadcast.held import apply_delta, decode_full, held_digest, join_weights
from fedge_contract.broadcast.records import Broadcast, Keyframe, broadcast_from_plain, keyframe_from_plain
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES, Manifest
from fedge_contract.cohort import Participation
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import _Reader
from fedge_contract.mqtt import Connection
from fedge_contract.packing import pieces
from fedge_contract.tensors import ModelSpec
from fedge_contract.transfer import chunk_base, send_chunked

__all__ = ["HEADER_FORMAT", "BroadcastState", "Broadcaster", "Sent"]

log = logging.getLogger("fedge.aggregator.broadcast")

HEADER_FORMAT = 1


@dataclass(frozen=True)
class Sent:
    """What one ``publish`` put on the broker, in bytes (whole message, or manifest plus chunks)."""

    version: int
    kind: str  # full | delta | hold
    announcement: int  # what every device that follows downloads for this version
    keyframe: int = 0  # a new keyframe on global/key (devices download it only to catch up)
    retained: int = 0  # the retained copy on global/delta/<version> (likewise)
    task: int = 0  # a GlobalTask on global/task (devices download it once per task)
    cleared: int = 0  # retained topics emptied (retired deltas, obsolete chunks)

    @property
    def total(self) -> int:
        return self.announcement + self.keyframe + self.retained + self.task


class Broadcaster:
    """Publishes the versions a BroadcastEncoder makes, and keeps what a restart needs to resume."""

    def __init__(
        self,
        conn: Connection | None,
        topics: Topics,
        spec: ModelSpec,
        policy: BroadcastPolicy | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        encoder: BroadcastEncoder | None = None,
    ) -> None:
        self._conn = conn  # None until ``bind``: versions can be made (``begin``, ``advance``) before the aggregator connects
        self.topics = topics
        self.spec = spec
        self.max_message_bytes = max_message_bytes
        self.encoder = encoder or BroadcastEncoder(spec, policy or BroadcastPolicy())
        if policy is not None and encoder is not None:
            self.encoder.policy = policy
        self._task_id: bytes | None = None  # the task last put on global/task (announcements name it)
        self._chunk_sets: dict[str, int] = {}  # chunk bases published (global/<v>, global/key/<k>, global/delta/<u>) -> chunks
        self._stale: list[str] = []  # retained topics to empty once the current version is out
        self._sizes: dict[str, int] = {}  # retained topic -> bytes published there (for the catch-up figures)
        self._items: dict[str, Item] = {}  # state items packed so far (immutable: packed once, not every version)
        self._lock = asyncio.Lock()
        self.sent: list[Sent] = []  # what each publish in this process sent, oldest first

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the broadcaster has no connection yet: bind() it before publishing")
        return self._conn

    def bind(self, conn: Connection) -> None:
        """The connection to publish on (the aggregator connects after it resumed its model and this state)."""
        self._conn = conn

    # ------------------------------------------------------------------ versions (no I/O)
    @property
    def policy(self) -> BroadcastPolicy:
        return self.encoder.policy

    @property
    def version(self) -> int:
        return self.encoder.version

    @property
    def started(self) -> bool:
        try:
            self.encoder.latest  # noqa: B018 - raises before begin()
        except RuntimeError:
            return False
        return True

    @property
    def held(self) -> Mapping[str, np.ndarray]:
        """The model devices hold at ``version``: what they train from and what their deltas are against."""
        return self.encoder.held

    @property
    def held_hash(self) -> bytes:
        return self.encoder.held_hash

    def about(self, round: int, deadline: float | None, task: TaskConfig, *, final: bool = False,
              cohort: Participation | None = None) -> Announcement:
        """The announcement fields of the current version (``publish``/``announce`` decide whether the task goes inline)."""
        return Announcement(self.topics.fleet, round, deadline, task, self.spec.fingerprint, final, cohort=cohort)

    def begin(self, weights: Mapping[str, np.ndarray], version: int, *, devices_hold: bool) -> Step:
        """The first version this broadcaster publishes (see BroadcastEncoder.begin).

        ``devices_hold=True`` only for the task's initial model at version 0 (every device builds it
        from the task's seed: a 300-byte hold); an aggregator that resumes a checkpoint without
        broadcast state (an older store) begins with ``devices_hold=False``: a full keyframe.
        """
        return self.encoder.begin(weights, version, devices_hold=devices_hold)

    def advance(self, weights: Mapping[str, np.ndarray], version: int) -> Step:
        """The broadcast of ``version`` for the true model ``weights``; commit ``state()`` before ``publish``."""
        previous, keyframe = self.encoder.latest.version, self.encoder.keyframe.version
        step = self.encoder.advance(weights, version)
        self._stale += self._chunk_topics(self.topics.global_chunks(previous))
        if step.keyframe is not None:
            self._stale += self._chunk_topics(self.topics.keyframe_chunks(keyframe))
        for retired in step.retire:
            base = self.topics.global_delta(retired)
            self._stale += [base, *self._chunk_topics(base)]
            self._sizes.pop(base, None)
        return step

    def request_keyframe(self) -> None:
        """A keyframe at the next version (many devices catching up, devices that cannot rebuild, an operator)."""
        self.encoder.request_keyframe()

    def _chunk_topics(self, base: str) -> list[str]:
        """The chunk topics of a set about to become obsolete, one more than published (a size at a boundary)."""
        count = self._chunk_sets.pop(base, 0)
        return [f"{base}/{i}" for i in range(count + 1)] if count else []

    # ------------------------------------------------------------------ publishing
    async def publish(self, step: Step, about: Announcement) -> Sent:
        """Put ``step`` on the broker: task, keyframe, retained copy, announcement, then empty what is obsolete."""
        async with self._lock:
            about = self._with_task(about)
            task = await self._publish_task(about.task)
            keyframe = retained = 0
            if step.keyframe is not None:
                keyframe = await self._publish_keyframe(step.keyframe, about)
            payload = await _encoded(step.broadcast, about)
            if step.retained:
                retained = await self._put(self.topics.global_delta(step.broadcast.version), payload, "delta", step.broadcast.version)
            announcement = await self._announce(payload, step.broadcast.version)
            cleared = await self._clear_stale()
            sent = Sent(step.broadcast.version, step.broadcast.kind, announcement, keyframe, retained, task, cleared)
            self.sent.append(sent)
            log.info("broadcast v%d (%s): %d bytes to every device; keyframe %d, retained %d, task %d bytes; %d topics cleared",
                     sent.version, sent.kind, sent.announcement, keyframe, retained, task, cleared)
            return sent

    async def announce(self, about: Announcement) -> Sent:
        """Announce the current version again (a new round or deadline, the final model): what it sent."""
        async with self._lock:
            about = self._with_task(about)
            task = await self._publish_task(about.task)
            latest = self.encoder.latest
            announcement = await self._announce(await _encoded(latest, about), latest.version)
            return Sent(latest.version, latest.kind, announcement, task=task)

    def clear_retained_deltas(self, versions: range) -> None:
        """Empty ``global/delta/<u>`` for ``versions`` after the next publish: what an earlier broadcast state (lost,
        or unusable) may have left there, which no announcement of this one names."""
        self._stale += [self.topics.global_delta(u) for u in versions]

    async def republish(self, about: Announcement) -> Sent:
        """Everything retained again, from the stored bytes: after a restart, or a broker that lost its retained messages."""
        async with self._lock:
            self._task_id = None  # put the task back too
            about = self._with_task(about)
            task = await self._publish_task(about.task)
            keyframe = await self._publish_keyframe(self.encoder.keyframe, about)
            retained = 0
            for delta in self.encoder.retained:
                retained += await self._put(self.topics.global_delta(delta.version), await _encoded(delta, about), "delta", delta.version)
            latest = self.encoder.latest
            announcement = await self._announce(await _encoded(latest, about), latest.version)
            cleared = await self._clear_stale()
            return Sent(latest.version, latest.kind, announcement, keyframe, retained, task, cleared)

    def _with_task(self, about: Announcement) -> Announcement:
        return replace(about, fingerprint=self.spec.fingerprint, inline_task=task_id(about.task) != self._task_id)

    async def _publish_task(self, task: TaskConfig) -> int:
        ident = task_id(task)
        if ident == self._task_id:
            return 0
        payload = GlobalTask(self.topics.fleet, task).to_bytes()
        await self.conn.publish(self.topics.global_task, payload, retain=True)
        self._task_id = ident
        return len(payload)

    async def _publish_keyframe(self, keyframe: Keyframe, about: Announcement) -> int:
        return await self._put(self.topics.global_keyframe, await _encoded(keyframe, about), "keyframe", keyframe.version)

    async def _announce(self, payload: bytes | bytearray, version: int) -> int:
        return await self._put(self.topics.global_model, payload, "global", version)

    async def _put(self, topic: str, payload: bytes | bytearray, kind: str, version: int) -> int:
        """One retained message, or its chunks then its manifest; the bytes published."""
        if len(payload) <= self.max_message_bytes:
            await self.conn.publish(topic, bytes(payload), retain=True)
            self._sizes[topic] = len(payload)
            return len(payload)
        manifest = await asyncio.to_thread(  # hashing every chunk of a large message: off the loop
            Manifest.of, payload, fleet=self.topics.fleet, kind=kind, chunk_size=self.max_message_bytes, model_version=version)
        base = chunk_base(self.topics, manifest)
        self._chunk_sets[base] = max(manifest.count, self._chunk_sets.get(base, 0))
        await send_chunked(self.conn, self.topics, manifest, payload, topic=topic, retain=True)
        sent = len(payload) + len(manifest.to_bytes())
        self._sizes[topic] = sent
        return sent

    async def _clear_stale(self) -> int:
        count = 0
        while self._stale:
            await self.conn.publish(self._stale[0], b"", retain=True)
            self._stale.pop(0)
            count += 1
        return count

    # ------------------------------------------------------------------ figures
    def catch_up_bytes(self) -> int:
        """What a device that holds nothing downloads now: the keyframe and every retained delta (as published)."""
        topics = [self.topics.global_keyframe, *(self.topics.global_delta(b.version) for b in self.encoder.retained)]
        return sum(self._sizes.get(topic, 0) for topic in topics)

    def worst_case_catch_up_bytes(self) -> int:
        """The bound of fedge_contract.broadcast.policy for this model, with the largest delta sent so far."""
        deltas = [b.nbytes for b in self.encoder.retained] + [self.encoder.latest.nbytes]
        envelope = max((s.announcement for s in self.sent), default=0) - self.encoder.latest.nbytes
        return worst_case_catch_up_bytes(self.encoder.keyframe.nbytes, max(deltas), self.policy, max(envelope, 0))

    # ------------------------------------------------------------------ persistence
    def state(self) -> BroadcastState:
        """What the store commits with the checkpoint of ``version`` (see the module docstring).

        Items are packed once and reused: a version packs only its new delta (a keyframe of a 10M
        model is ~37 MB). An item is its msgpack encoding as pieces (fedge_contract.packing): the
        large binary values are views of the encoded tensors, not copies, and the store writes
        them a step at a time. Pure CPU: call it off the event loop with ``advance`` for large models.
        """
        latest, keyframe = self.encoder.latest, self.encoder.keyframe
        items = {f"keyframe/{keyframe.version}": self._item(f"keyframe/{keyframe.version}", keyframe)}
        for delta in self.encoder.retained:
            items[f"delta/{delta.version}"] = self._item(f"delta/{delta.version}", delta)
        latest_key = f"delta/{latest.version}"
        if latest_key not in items:
            latest_key = f"latest/{latest.version}"
            items[latest_key] = self._item(latest_key, latest)
        self._items = {key: self._items[key] for key in items}
        header = {
            "format": HEADER_FORMAT, "fingerprint": self.spec.fingerprint, "version": latest.version,
            "held_hash": latest.held_hash, "keyframe": f"keyframe/{keyframe.version}", "latest": latest_key,
            "retained": [f"delta/{b.version}" for b in self.encoder.retained], "keyframe_due": self.encoder.keyframe_requested,
            "task_id": self._task_id, "chunk_sets": dict(self._chunk_sets), "stale": list(self._stale), "items": sorted(items),
        }
        return BroadcastState(latest.version, _pack(header), items)

    def _item(self, key: str, record: Broadcast | Keyframe) -> Item:
        packed = self._items.get(key)
        if packed is None:
            packed = self._items[key] = tuple(pieces(record.to_plain()))
        return packed

    @classmethod
    def from_state(
        cls,
        conn: Connection | None,
        topics: Topics,
        spec: ModelSpec,
        policy: BroadcastPolicy,
        state: BroadcastState,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> Broadcaster:
        """Resume from what the store kept; DecodeError for state that is broken, incomplete or another model's.

        The caller (the coordinator) then begins afresh: ``begin(true_weights, version,
        devices_hold=False)``, a full keyframe that every device downloads once.
        """
        header = _Reader(_unpack_plain(state.header, "broadcast header"), "broadcast header")
        if header.take("format", int) != HEADER_FORMAT:
            raise DecodeError(Reason.SCHEMA, f"broadcast header format {header.obj.get('format')!r} is not {HEADER_FORMAT}")
        if header.take("fingerprint", str) != spec.fingerprint:
            raise DecodeError(Reason.FINGERPRINT, "broadcast state of another model architecture")

        def item(key: str) -> object:
            blob = state.items.get(key)
            if blob is None:
                raise DecodeError(Reason.INCOMPLETE, f"broadcast state: item {key!r} is missing")
            return _unpack_plain(item_bytes(blob), key)

        keyframe = keyframe_from_plain(item(header.take("keyframe", str)), "broadcast state keyframe")
        retained = [broadcast_from_plain(item(key), key) for key in header.take("retained", list)]
        latest = broadcast_from_plain(item(header.take("latest", str)), "broadcast state latest")
        held = _rebuild(keyframe, retained, latest, spec)
        if latest.held_hash != header.take("held_hash", bytes) or latest.version != header.nonneg_int("version"):
            raise DecodeError(Reason.BAD_VALUE, "broadcast header does not describe its latest broadcast")
        encoder = BroadcastEncoder.from_state({
            "format": 1, "fingerprint": spec.fingerprint, "held": join_weights(held, spec), "latest": latest.to_plain(),
            "keyframe": keyframe.to_plain(), "retained": [b.to_plain() for b in retained], "keyframe_due": header.take("keyframe_due", bool),
        }, spec, policy)
        broadcaster = cls(conn, topics, spec, max_message_bytes=max_message_bytes, encoder=encoder)
        ident = header.take("task_id", bytes, nullable=True)
        broadcaster._task_id = ident
        prefix = topics.global_model + "/"
        sets = header.take("chunk_sets", dict)
        stale = header.take("stale", list)
        for topic in [*sets, *stale]:
            if not isinstance(topic, str) or not topic.startswith(prefix):
                raise DecodeError(Reason.BAD_VALUE, f"broadcast state names a topic outside {prefix}#: {topic!r}")
        if not all(isinstance(count, int) and 0 < count <= 1 << 16 for count in sets.values()):
            raise DecodeError(Reason.BAD_VALUE, "broadcast state: a chunk count is out of range")
        broadcaster._chunk_sets, broadcaster._stale = dict(sets), list(stale)
        return broadcaster


_OFF_LOOP_BYTES = 1 << 20  # messages with more tensor data than this are encoded on a worker thread


async def _encoded(record: Broadcast | Keyframe, about: Announcement) -> bytes | bytearray:
    """The record's message bytes; a large one off the event loop, assembled a piece at a time
    (fedge_contract.packing: one msgpack copy of a 100 MB keyframe holds the GIL ~150 ms)."""
    if record.nbytes <= _OFF_LOOP_BYTES:
        return record.message(about).to_bytes()
    return await asyncio.to_thread(lambda: record.message(about).to_buffer())


def _rebuild(keyframe: Keyframe, retained: list[Broadcast], latest: Broadcast, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The held model of ``latest``, from the keyframe and the retained deltas (as a device catches up)."""
    held = decode_full(keyframe.tensors, spec)
    if held_digest(held, spec) != keyframe.held_hash:
        raise DecodeError(Reason.HASH_MISMATCH, f"broadcast state: keyframe v{keyframe.version} does not decode to its hash")
    version = keyframe.version
    chain = list(retained)
    if latest.kind == "delta" and latest.version > keyframe.version and (not chain or chain[-1].version != latest.version):
        chain.append(latest)
    for delta in chain:
        if delta.base_version != version:
            raise DecodeError(Reason.BAD_VALUE, f"broadcast state: delta v{delta.version} does not follow v{version}")
        held = apply_delta(held, delta.tensors, spec)
        version = delta.version
    if version != latest.version or held_digest(held, spec) != latest.held_hash:
        raise DecodeError(Reason.HASH_MISMATCH, f"broadcast state: the keyframe and deltas do not rebuild v{latest.version}")
    return held


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _unpack_plain(blob: bytes, where: str) -> object:
    try:
        return msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception as exc:
        raise DecodeError(Reason.MALFORMED, f"{where} is not valid msgpack ({type(exc).__name__})") from None


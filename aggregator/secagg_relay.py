"""The aggregator's side of secure aggregation (issue 17): one ServerSession over MQTT, driven by the coordinator.

The coordinator owns the loop, the clock, the connection and the store; this adapter owns the
protocol. It never blocks the loop and never sleeps: the coordinator calls it when something
happens and asks it when it next needs the time.

    relay = SecAggRelay(fleet, conn, spec, spool=..., checkpoint=...)
    conn subscribes relay.subscriptions()
    setup = await relay.start(round_no, cohort, now=clock())
    per MQTT message with relay.owns(topic):  refusals = await relay.on_message(topic, payload, now=clock())
    when clock() >= relay.next_wake():         refusals = await relay.on_wake(now=clock())
    after the connection reconnects:           await relay.republish()
    until relay.outcome is a SecureMean (the round's FedAvg mean delta) or an Abandoned reason

What it does with them (fedge_contract/secagg/DESIGN.md, topics and wiring):
- decodes each device message by its topic (``secagg/up/<kind>/<client_id>``), with a size bound,
  and refuses a sender that differs from its topic's client id (``client_mismatch``); every other
  hostile input is refused by the decoders or the session. A refusal is returned as a ``Refusal``
  (client, reason, detail: a receipt's fields) and changes nothing;
- reassembles chunked masked inputs (an update-kind manifest on ``up/masked/<id>``, chunks retained
  under ``up/masked/<id>/<session>/<i>``), then clears their chunk topics;
- hands every masked input to ``spool`` *before* the session folds it (the store keeps masked
  vectors only: the adapter never sees, and the store never holds, an individual delta);
- publishes what the session sends: the Setup on ``down/setup``, each KeyList on ``down/keys/<id>``,
  each ShareBundle on ``down/bundle/<id>``, the UnmaskRequest on ``down/unmask``, all retained (a
  device that reconnects finds them), and clears all of them when the session ends;
- calls ``checkpoint(snapshot)`` at the start and at every phase change (and at the end);
- ends with ``outcome``: ``SecureMean`` (``FixedPoint.decode_sum`` then ``Weighting.mean``: the
  sample-weighted mean delta of the survivors) or ``Abandoned`` (too few devices at some phase:
  nothing is folded; the coordinator retries the round with a new session, see ``start``).

Restarts: ``SecAggRelay.resume(snapshot, spooled, ...)`` rebuilds the session from the last
checkpoint and the spooled masked inputs (each counted once, checked against the digest the
snapshot kept), republishes the current phase's messages and goes on; the devices answer the
resent messages with their earlier answers. ``ResumeError``: abandon the session and start a new
one for the round (the devices join it with the same trained deltas and new keys).

The session's heavy steps (decoding and folding a masked input, ending the unmask phase: Shamir
rebuilds and one PRG expansion per survivor, up to a second at 1M parameters and 100 devices) run on
a worker thread, one at a time.

``check_compatible`` is the configuration check: what secure aggregation cannot run with, and why.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from fedge_contract import DecodeError, Receipt, ReceiptStatus
from fedge_contract.aio import ThreadMeter
from fedge_contract.chunks import Busy, ChunkLimits, Manifest, Reassembler, is_manifest
from fedge_contract.errors import Reason
from fedge_contract.secagg import (
    Abandoned,
    Aggregate,
    DeviceMessage,
    KeyList,
    MaskedInput,
    ParameterError,
    Phase,
    PhaseTimeouts,
    ProtocolError,
    ResumeError,
    ServerMessage,
    ServerSession,
    Setup,
    ShareBundle,
    UnmaskRequest,
    new_session_id,
)
from fedge_contract.secagg.announcement import SecureRound
from fedge_contract.secagg.crypto import Randomness
from fedge_contract.secagg.messages import DEFAULT_MAX_BYTES
from fedge_contract.secagg.params import recommended
from fedge_contract.secagg.topics import SecAggTopics
from fedge_contract.tensors import ModelSpec

R = TypeVar("R")
log = logging.getLogger("fedge.aggregator.secagg")
SNAPSHOT_VERSION = 1
SENDER = "aggregator"  # the Setup's sender: devices accept the later messages only from it
_IN_FLIGHT = 8  # retained publishes awaited together
_ENVELOPE = 4096  # a masked input's bytes beyond its ring elements (header, ids), with room to spare


# ---------------------------------------------------------------- what secure aggregation cannot run with


class SecureAggregationUnsupported(ValueError):
    """A configuration secure aggregation cannot serve; the message says which options and why."""


def refusals(
    *, mode: str = "sync", aggregation: str = "mean", codec: str = "none", clip_factor: float | None = None,
    clip_action: str = "clip", workers: int = 0,
) -> list[str]:
    """Why ``--secure-aggregation`` cannot run with these settings (empty: it can). Pure: the config calls it."""
    found = []
    if mode != "sync":
        found.append(f"--secure-aggregation needs --mode sync, not {mode}: masks cancel only within one cohort that shares a "
                     "session, and asynchronous rounds admit updates one at a time")
    if aggregation != "mean":
        found.append(f"--secure-aggregation cannot run --aggregation {aggregation}: robust rules need every device's update, "
                     "which secure aggregation exists to hide; use --aggregation mean with a fixed --clip-norm (applied on the devices)")
    if codec != "none":
        found.append(f"--secure-aggregation sends dense fixed-point vectors, so the update codec must be 'none', not {codec!r}: "
                     "top-k would leak which coordinates a device moved and masked sums cannot be sparse; quantisers and "
                     "compressors gain nothing on masked data")
    if clip_factor is not None:
        found.append("--secure-aggregation cannot run --clip-norm auto: it follows the norms of individual updates, which the "
                     "aggregator no longer sees; use a fixed --clip-norm (the devices clip to it)")
    if clip_action != "clip":
        found.append(f"--secure-aggregation cannot run --clip-action {clip_action}: the aggregator cannot see an update's norm "
                     "to reject it; use --clip-action clip (the devices clip)")
    if workers:
        found.append(f"--secure-aggregation cannot run --workers {workers}: ingest workers read plain updates, while masked "
                     "inputs go to the coordinator's session on the secagg topics; use --workers 0")
    return found


def check_compatible(**settings: Any) -> None:
    """SecureAggregationUnsupported naming every refused setting (see ``refusals``), else nothing."""
    found = refusals(**settings)
    if found:
        raise SecureAggregationUnsupported("; ".join(found))


# ---------------------------------------------------------------- the adapter's types


class Transport(Protocol):
    """The coordinator's MQTT connection, as far as the adapter uses it (fedge_contract.mqtt.Connection)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...

    async def subscribe(self, topic: str) -> None: ...

    async def unsubscribe(self, topic: str) -> None: ...


Spool = Callable[[str, str, bytes], Awaitable[None]]  # (session, client id, MaskedInput wire bytes): durable before it returns
Checkpoint = Callable[[dict[str, Any]], Awaitable[None]]  # the adapter's snapshot: durable before it returns


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol's parameters for a round; None picks ``params.recommended`` for the cohort."""

    max_weight: int = 1000  # FedAvg weighting through a sum: a device weighs min(num_samples, max_weight) / max_weight
    clip: float = 8.0  # fixed point: each coordinate clipped to [-clip, clip] (DESIGN.md: no measurable cost on digits)
    ring_bits: int = 32
    clip_norm: float | None = None  # an L2 bound the devices apply to their delta before encoding
    degree: int | None = None
    threshold: int | None = None
    min_survivors: int | None = None
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    chunk_timeout: float = 60.0  # seconds without a new chunk of a chunked masked input before it is refused
    max_chunked: int = 16  # chunked masked inputs reassembled at once (the others wait their turn)

    def __post_init__(self) -> None:
        _ = self.announcement  # validates max_weight and clip_norm
        if not self.chunk_timeout > 0 or self.max_chunked < 1:
            raise ParameterError("chunk_timeout must be > 0 and max_chunked >= 1")

    @property
    def announcement(self) -> SecureRound:
        """What the round's GlobalModel carries in ``task.extra`` (``announcement.to_extra()``)."""
        return SecureRound(max_weight=self.max_weight, clip_norm=self.clip_norm)

    def setup(self, fleet: str, round_no: int, cohort: Sequence[str], length: int, session: str) -> Setup:
        members = tuple(sorted(set(cohort)))
        rec = recommended(len(members))
        return Setup(
            fleet=fleet, round=round_no, session=session, sender=SENDER, cohort=members,
            degree=self.degree or rec.degree, threshold=self.threshold or rec.threshold,
            min_survivors=self.min_survivors or rec.min_survivors, ring_bits=self.ring_bits, length=length, clip=self.clip,
        )


@dataclass(frozen=True)
class Refusal:
    """A device message the adapter refused: a receipt's fields. Nothing changed because of it."""

    client_id: str
    topic: str
    reason: Reason
    detail: str
    round: int | None
    session: str | None

    def receipt(self, fleet: str, model_version: int) -> Receipt:
        """The rejection receipt to publish on the device's receipts topic (``update_id``: the session, if known)."""
        return Receipt(fleet, self.client_id, self.session, ReceiptStatus.REJECTED, f"{self.reason.value}: {self.detail}",
                       self.round or 0, model_version)


@dataclass(frozen=True)
class SecureMean:
    """A session's result: the survivors' sample-weighted mean delta, and nothing about any one of them."""

    round: int
    session: str
    delta: dict[str, np.ndarray]  # float32, the model's tensors
    weight: float  # the summed weights, in samples (each device's capped at max_weight)
    count: int  # how many inputs the sum holds
    survivors: tuple[str, ...]
    aggregate: Aggregate  # the ring sum itself (tests check it against the devices' inputs)


@dataclass
class RelayStats:
    bytes_in: int = 0  # device payloads received on secagg topics (chunks included)
    bytes_out: int = 0  # payloads published (clearing included)
    cpu_seconds: float = 0.0  # thread time of decoding, the session's steps and the final decode
    refused: int = 0


# ---------------------------------------------------------------- the adapter


class SecAggRelay:
    def __init__(
        self,
        fleet: str,
        transport: Transport,
        spec: ModelSpec,
        *,
        spool: Spool,
        checkpoint: Checkpoint,
        settings: SecAggSettings = SecAggSettings(),
        random: Randomness = os.urandom,
    ) -> None:
        self.topics = SecAggTopics(fleet)
        self.transport = transport
        self.spec = spec
        self.settings = settings
        self.stats = RelayStats()
        self.outcome: SecureMean | Abandoned | None = None
        self._spool = spool
        self._checkpoint = checkpoint
        self._random = random
        self._session: ServerSession | None = None
        self._now = 0.0
        self._lock = asyncio.Lock()
        self._meter = ThreadMeter()
        self._chunks = Reassembler(ChunkLimits(max_size=1, timeout=settings.chunk_timeout), clock=lambda: self._now)
        self._waiting: dict[str, Manifest] = {}  # chunked inputs waiting for room, by chunk base
        self._cleared = True  # retained topics of the session emptied

    # ---------------------------------------------------------------- what the coordinator calls

    def subscriptions(self) -> list[str]:
        """What the coordinator's connection subscribes to (the chunk topics are subscribed as needed)."""
        return [self.topics.all_from_devices]

    def owns(self, topic: str) -> bool:
        return self.topics.parse_device(topic) is not None or self.topics.parse_masked_chunk(topic) is not None

    @property
    def setup(self) -> Setup | None:
        return self._session.setup if self._session is not None else None

    @property
    def phase(self) -> Phase | None:
        return self._session.phase if self._session is not None else None

    def waiting_for(self) -> tuple[str, ...]:
        return self._session.waiting_for() if self._session is not None else ()

    async def start(self, round_no: int, cohort: Sequence[str], *, now: float) -> Setup:
        """Open a session for ``round_no`` with the selected ``cohort`` (3 or more devices, sorted or not).

        Also how a round is retried after ``Abandoned``: a new session id, new keys on every device,
        the same trained deltas. ParameterError for a cohort the protocol cannot serve.
        """
        async with self._lock:
            if self._session is not None and self.outcome is None:
                raise RuntimeError(f"session {self._session.setup.session} of round {self._session.setup.round} is still running")
            setup = self.settings.setup(self.topics.fleet, round_no, cohort, self.spec.num_parameters + 1, new_session_id(self._random))
            self._now = now
            self._session = ServerSession(setup, now=now, random=self._random, timeouts=self.settings.timeouts)
            self.outcome = None
            self._reset_chunks()
            self._limit_chunks(setup)
            self._cleared = False
            await self._publish(self.topics.unmask, b"", retain=True)  # a crashed earlier session's request, if any
            await self._send(self._session.pending())
            await self._save()
            log.info("secure aggregation: session %s of round %d opened for %d devices (k=%d, t=%d)", setup.session, round_no,
                     len(setup.cohort), setup.degree, setup.threshold, extra={"round": round_no, "session": setup.session})
            return setup

    async def on_message(self, topic: str, payload: bytes, *, now: float) -> list[Refusal]:
        """One message on a topic the adapter ``owns``; the refusals to answer (none: taken, or a harmless repeat)."""
        async with self._lock:
            self._now = now
            self.stats.bytes_in += len(payload)
            chunk = self.topics.parse_masked_chunk(topic)
            if chunk is not None:
                refused = await self._on_chunk(self.topics.masked_chunks(chunk.client_id, chunk.session), chunk.index, payload)
            else:
                refused = await self._on_device(topic, payload)
            self.stats.refused += len(refused)
            return refused

    def next_wake(self) -> float | None:
        """When ``on_wake`` must be called next (a phase's deadline, a stalled chunked input); None: nothing pending."""
        if self._session is None or self.outcome is not None:
            return None
        chunks = self._chunks.next_deadline()
        return self._session.deadline if chunks is None else min(self._session.deadline, chunks)

    async def on_wake(self, *, now: float) -> list[Refusal]:
        """The time has come (``next_wake``): refuse stalled chunked inputs, end a phase whose deadline passed."""
        async with self._lock:
            self._now = now
            refused = [await self._stalled(stalled.key, stalled.manifest, stalled.error) for stalled in self._chunks.expire()]
            await self._promote()
            session = self._session
            if session is not None and self.outcome is None:
                before = session.phase
                sends = await self._work(session.poll, now=now)
                await self._after_step(before, sends)
            return refused

    def extend_phase(self, until: float) -> None:
        """Keep the current phase open at least until ``until``: devices cut off by a restart or a broker outage
        need their reconnect schedule to come back and answer (the coordinator's resend grace)."""
        if self._session is not None and self.outcome is None:
            self._session.deadline = max(self._session.deadline, until)

    def snapshot(self) -> dict[str, Any]:
        """The adapter's state as plain values (no vector): the session's snapshot. What ``checkpoint`` receives."""
        if self._session is None:
            raise RuntimeError("no session has been started")
        return {"version": SNAPSHOT_VERSION, "server": self._session.snapshot()}

    @classmethod
    async def resume(
        cls,
        snapshot: dict[str, Any],
        spooled: Iterable[bytes],
        *,
        fleet: str,
        transport: Transport,
        spec: ModelSpec,
        spool: Spool,
        checkpoint: Checkpoint,
        now: float,
        settings: SecAggSettings = SecAggSettings(),
        random: Randomness = os.urandom,
    ) -> SecAggRelay:
        """The adapter of a session that was running when the aggregator stopped: from its last checkpoint
        and the spooled masked inputs of that session (any order, repeats allowed).

        Republishes the current phase's messages (the devices answer them again) and, for a session
        that had ended, recomputes its outcome. ResumeError: start a new session for the round instead.
        """
        relay = cls(fleet, transport, spec, spool=spool, checkpoint=checkpoint, settings=settings, random=random)
        if not isinstance(snapshot, dict) or snapshot.get("version") != SNAPSHOT_VERSION or not isinstance(snapshot.get("server"), dict):
            raise ResumeError("not a secure-aggregation relay snapshot of this version")
        inputs = []
        for payload in spooled:
            try:
                inputs.append(MaskedInput.from_bytes(payload, fleet=fleet, max_bytes=len(payload)))
            except DecodeError as exc:
                log.warning("secure aggregation: skipping an unreadable spooled masked input: %s", exc)
        session = await relay._work(ServerSession.restore, snapshot["server"], inputs, now=now, random=random, timeouts=settings.timeouts)
        if session.setup.fleet != fleet or session.setup.length != spec.num_parameters + 1:
            raise ResumeError(f"the snapshot is of fleet {session.setup.fleet} with {session.setup.length} coordinates")
        async with relay._lock:
            relay._now = now
            relay._session = session
            relay._cleared = False
            relay._limit_chunks(session.setup)
            if session.outcome is not None:
                await relay._finish(session)
            else:
                await relay._send(session.pending())
                await relay._save()
            log.info("secure aggregation: session %s of round %d resumed in the %s phase", session.setup.session, session.setup.round,
                     session.phase.value, extra={"round": session.setup.round, "session": session.setup.session})
        return relay

    async def republish(self) -> None:
        """Publish the current phase's messages again (the coordinator calls it after a reconnect).

        A broker that restarted may have lost retained messages, and a clean-session coordinator
        the answers sent while it was away: the devices answer what they receive again with the
        same bytes, so nothing is counted twice.
        """
        async with self._lock:
            if self._session is not None and self.outcome is None:
                await self._send(self._session.pending())

    async def close(self) -> None:
        """Stop: empty the session's retained topics and drop partial chunked inputs (idempotent).

        The coordinator calls it when it gives a running session up (shutdown, a newer round);
        a session that ends by itself has done so already.
        """
        async with self._lock:
            await self._drop_chunks()
            if self._session is not None:
                await self._clear(self._session.setup)

    # ---------------------------------------------------------------- device messages

    async def _on_device(self, topic: str, payload: bytes) -> list[Refusal]:
        parsed = self.topics.parse_device(topic)
        if parsed is None or not payload:
            return []  # not a protocol topic; or an empty (clearing) publish
        client = parsed.client_id
        session = self._session
        if session is None:
            return [self._refusal(client, topic, Reason.WRONG_SESSION, "no secure-aggregation session is running", None)]
        if parsed.kind is MaskedInput and is_manifest(payload):
            return await self._on_manifest(topic, client, payload, session)
        limit = self._masked_bytes(session.setup) if parsed.kind is MaskedInput else DEFAULT_MAX_BYTES
        try:
            message: DeviceMessage = await self._work(parsed.kind.from_bytes, payload, fleet=self.topics.fleet, max_bytes=limit)
        except DecodeError as exc:
            return [self._refusal(client, topic, exc.reason, exc.detail, None)]
        if message.sender != client:
            return [self._refusal(client, topic, Reason.CLIENT_MISMATCH, f"a {message.TYPE} from {message.sender} on {client}'s topic", message)]
        return await self._take(topic, message, session)

    async def _take(self, topic: str, message: DeviceMessage, session: ServerSession) -> list[Refusal]:
        if isinstance(message, MaskedInput) and self._awaited(session, message):
            await self._spool(message.session, message.sender, message.to_bytes())  # durable before it counts
        before = session.phase
        try:
            step = await self._work(session.handle, message, now=self._now)
        except ProtocolError as exc:
            return [self._refusal(message.sender, topic, exc.reason, exc.detail, message)]
        await self._after_step(before, step.send)
        return []

    @staticmethod
    def _awaited(session: ServerSession, message: MaskedInput) -> bool:
        """Whether the session would count this masked input now: only those are spooled (never a refused one)."""
        setup = session.setup
        return (session.phase is Phase.MASK and message.session == setup.session and message.round == setup.round
                and message.sender in session.waiting_for() and message.bits == setup.ring_bits and message.length == setup.length)

    # ---------------------------------------------------------------- chunked masked inputs

    async def _on_manifest(self, topic: str, client: str, payload: bytes, session: ServerSession) -> list[Refusal]:
        setup = session.setup
        try:
            manifest = Manifest.from_bytes(payload, max_size=self._masked_bytes(setup), fleet=self.topics.fleet)
        except DecodeError as exc:
            return [self._refusal(client, topic, exc.reason, exc.detail, None)]
        if manifest.kind != "update" or manifest.client_id != client:
            return [self._refusal(client, topic, Reason.CLIENT_MISMATCH,
                                  f"a {manifest.kind} manifest of {manifest.client_id} on {client}'s masked-input topic", None)]
        if manifest.update_id != setup.session:
            return [self._refusal(client, topic, Reason.WRONG_SESSION,
                                  f"a chunked masked input of session {manifest.update_id}, not {setup.session}", None)]
        if session.phase is not Phase.MASK:
            return [self._refusal(client, topic, Reason.WRONG_PHASE, f"a masked input from {client} in the {session.phase.value} phase", None)]
        if client not in session.waiting_for():
            return []  # its masked input is in the sum already: a resend
        key = self.topics.masked_chunks(client, setup.session)
        try:
            started = self._chunks.start(key, manifest)
        except Busy:
            self._waiting[key] = manifest
            return []
        except DecodeError as exc:
            return [self._refusal(client, topic, exc.reason, exc.detail, None)]
        if started:
            await self.transport.subscribe(f"{key}/+")  # the broker sends the retained chunks
        return []

    async def _on_chunk(self, key: str, index: int, payload: bytes) -> list[Refusal]:
        if key not in self._chunks or not payload:
            return []  # not being fetched (done, refused, or a stray retained copy); or a topic being cleared
        manifest = self._chunks.manifest(key)
        try:
            whole = self._chunks.add(key, index, payload)
        except DecodeError as exc:
            self._chunks.drop(key)
            return [await self._stalled(key, manifest, exc)]
        if whole is None:
            return []
        await self._done_with(key, manifest)
        await self._promote()
        session = self._session
        assert session is not None and manifest.client_id is not None
        topic = self.topics.device(MaskedInput, manifest.client_id)
        try:
            message = await self._work(MaskedInput.from_bytes, whole, fleet=self.topics.fleet, max_bytes=len(whole))
        except DecodeError as exc:
            return [self._refusal(manifest.client_id, topic, exc.reason, exc.detail, None)]
        if message.sender != manifest.client_id:
            return [self._refusal(manifest.client_id, topic, Reason.CLIENT_MISMATCH,
                                  f"a masked input from {message.sender} in {manifest.client_id}'s chunks", message)]
        return await self._take(topic, message, session)

    async def _stalled(self, key: str, manifest: Manifest, error: DecodeError) -> Refusal:
        await self._done_with(key, manifest)
        assert manifest.client_id is not None
        return self._refusal(manifest.client_id, self.topics.device(MaskedInput, manifest.client_id), error.reason, error.detail, None,
                             session=manifest.update_id)

    async def _done_with(self, key: str, manifest: Manifest) -> None:
        await self.transport.unsubscribe(f"{key}/+")
        for index in range(manifest.count):
            await self._publish(f"{key}/{index}", b"", retain=True)

    async def _promote(self) -> None:
        while self._waiting:
            key, manifest = next(iter(self._waiting.items()))
            try:
                self._chunks.start(key, manifest)
            except Busy:
                return
            except DecodeError:
                pass
            else:
                await self.transport.subscribe(f"{key}/+")
            del self._waiting[key]

    async def _drop_chunks(self) -> None:
        for key in self._chunks.keys():
            manifest = self._chunks.drop(key)
            if manifest is not None:
                await self.transport.unsubscribe(f"{key}/+")
        self._waiting.clear()

    def _reset_chunks(self) -> None:
        self._chunks = Reassembler(ChunkLimits(max_size=1, timeout=self.settings.chunk_timeout), clock=lambda: self._now)
        self._waiting.clear()

    def _limit_chunks(self, setup: Setup) -> None:
        size = self._masked_bytes(setup)
        self._chunks.limits = ChunkLimits(max_size=size, max_concurrent=self.settings.max_chunked,
                                          max_inflight_bytes=size * self.settings.max_chunked, timeout=self.settings.chunk_timeout)

    @staticmethod
    def _masked_bytes(setup: Setup) -> int:
        return setup.length * setup.ring.width + _ENVELOPE

    # ---------------------------------------------------------------- phases and the end

    async def _after_step(self, before: Phase, sends: tuple[ServerMessage, ...]) -> None:
        session = self._session
        assert session is not None
        if sends:
            await self._send(sends)
        if session.outcome is not None:
            await self._finish(session)
        elif session.phase is not before:
            log.info("secure aggregation: session %s entered the %s phase (%d devices in it)", session.setup.session,
                     session.phase.value, len(session.waiting_for()), extra={"round": session.setup.round, "session": session.setup.session})
            await self._save()

    async def _finish(self, session: ServerSession) -> None:
        setup, outcome = session.setup, session.outcome
        if isinstance(outcome, Aggregate):
            try:
                self.outcome = await self._work(self._mean, setup, outcome)
            except ParameterError as exc:  # a sum no honest cohort makes (a device sent a ring vector of its own)
                self.outcome = Abandoned(Phase.DONE, Reason.BAD_VALUE, f"the unmasked sum is unusable: {exc}")
        else:
            assert isinstance(outcome, Abandoned)
            self.outcome = outcome
        await self._save()
        await self._drop_chunks()
        await self._clear(setup)
        if isinstance(self.outcome, SecureMean):
            log.info("secure aggregation: session %s of round %d summed %d devices (weight %.0f samples)", setup.session, setup.round,
                     self.outcome.count, self.outcome.weight, extra={"round": setup.round, "session": setup.session})
        else:
            log.warning("secure aggregation: session %s of round %d abandoned in the %s phase: %s: %s", setup.session, setup.round,
                        self.outcome.phase.value, self.outcome.reason.value, self.outcome.detail,
                        extra={"round": setup.round, "session": setup.session, "reason": self.outcome.reason.value})

    def _mean(self, setup: Setup, aggregate: Aggregate) -> SecureMean:
        weighting = self.settings.announcement.weighting(setup.clip)
        mean, weight = weighting.mean(setup.fixed_point.decode_sum(aggregate.total, aggregate.count))
        if not np.all(np.isfinite(mean)):
            raise ParameterError("the mean is not finite")
        delta, offset = {}, 0
        for tensor in self.spec.tensors:
            size = int(np.prod(tensor.shape, dtype=np.int64))
            delta[tensor.name] = mean[offset : offset + size].reshape(tensor.shape).astype(np.float32)
            offset += size
        return SecureMean(setup.round, setup.session, delta, weight, aggregate.count, aggregate.survivors, aggregate)

    # ---------------------------------------------------------------- I/O

    async def _send(self, messages: Iterable[ServerMessage]) -> None:
        """Publish the session's messages, each retained on its topic."""
        await self._publish_all([(self._topic_of(m), m.to_bytes()) for m in messages])

    def _topic_of(self, message: ServerMessage) -> str:
        if isinstance(message, Setup):
            return self.topics.setup
        if isinstance(message, KeyList):
            return self.topics.keys(message.recipient)
        if isinstance(message, ShareBundle):
            return self.topics.bundle(message.recipient)
        assert isinstance(message, UnmaskRequest)
        return self.topics.unmask

    async def _clear(self, setup: Setup) -> None:
        if self._cleared:
            return
        topics = [self.topics.setup, self.topics.unmask]
        topics += [t for member in setup.cohort for t in (self.topics.keys(member), self.topics.bundle(member))]
        await self._publish_all([(topic, b"") for topic in topics])
        self._cleared = True

    async def _publish_all(self, items: list[tuple[str, bytes]]) -> None:
        """Retained publishes, a few in flight at a time: one PUBACK round trip per batch rather than
        per message, without piling up more pending calls than aiomqtt is comfortable with (it warns above 10)."""
        for start in range(0, len(items), _IN_FLIGHT):
            await asyncio.gather(*(self._publish(topic, payload, retain=True) for topic, payload in items[start : start + _IN_FLIGHT]))

    async def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        await self.transport.publish(topic, payload, retain=retain)
        self.stats.bytes_out += len(payload)

    async def _save(self) -> None:
        await self._checkpoint(self.snapshot())

    async def _work(self, function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``function`` on a worker thread; its CPU time counts in ``stats.cpu_seconds``."""
        result = await self._meter.run(function, *args, **kwargs)
        self.stats.cpu_seconds = self._meter.seconds
        return result

    def _refusal(self, client: str, topic: str, reason: Reason, detail: str, message: DeviceMessage | None, *,
                 session: str | None = None) -> Refusal:
        setup = self.setup
        refusal = Refusal(
            client, topic, reason, detail,
            message.round if message is not None else (setup.round if setup is not None else None),
            message.session if message is not None else (session or (setup.session if setup is not None else None)),
        )
        log.info("secure aggregation: refused a message on %s: %s: %s", topic, reason.value, detail,
                 extra={"client": client, "reason": reason.value})
        return refusal


__all__ = [
    "Checkpoint",
    "Refusal",
    "RelayStats",
    "SecAggRelay",
    "SecAggSettings",
    "SecureAggregationUnsupported",
    "SecureMean",
    "Spool",
    "Transport",
    "check_compatible",
    "refusals",
]

"""An agent's part in secure-aggregation rounds (issue 17): one DeviceSession at a time, over MQTT.

A round is secure when its announcement says so (``task.extra["secure_aggregation"]``,
fedge_contract/secagg/announcement.py). The agent trains as usual and hands the delta to this
module instead of its outbox. The protocol runs on the topics of fedge_contract/secagg/DESIGN.md:

- ``secagg/down/setup`` (retained): a Setup that names this device for the announced round starts a
  DeviceSession. Its KeyAdvert goes to ``up/advert/<id>``.
- ``down/keys/<id>`` and ``down/bundle/<id>`` (retained, readable by this device only): the answers
  (sealed Shares, then the MaskedInput) go to ``up/shares/<id>`` and ``up/masked/<id>``. A masked
  input above ``max_message_bytes`` goes as retained chunks under ``up/masked/<id>/<session>/<i>``
  and an update-kind manifest on ``up/masked/<id>``, as a large update would.
- ``down/unmask`` (retained): the Reveal goes to ``up/reveal/<id>``.

Every message received again (a reconnect re-delivers the retained ones) gets the same answer
again, which is how answers lost with a connection or a restarted aggregator come back.

A refusal (a ProtocolError of the session, a Setup this device cannot serve) means sitting the
session out: the session is dropped, a warning says why, and presence carries the reason under
``device["secagg"]`` until the next session. Messages of another session (stale retained ones)
are ignored quietly. The trained delta stays for a retried session of the same round.

Restarts: the session's secrets (two X25519 keys, the mask seed, the shares held) live in memory
only. Persisting them would put key material on disk for a session that lasts minutes, and a
device that lost them must never answer again with fresh ones (its neighbours would have sealed
shares for the old keys: the session would fail for everyone). So the ids of the sessions this
device joined are written to ``<state_dir>/secagg/sessions.json`` *before* its advert leaves; a
restarted agent that finds the current session there sits it out. The trained delta itself is
kept in ``<state_dir>/secagg/input.bin`` (raw float32, never pickle), so a retried session of the
same round (a new id, new keys, a new mask seed) can still count it.

The session's crypto (X25519, Shamir for k neighbours, sealing, the PRG expansions of the mask
phase) costs milliseconds to a tenth of a second (DESIGN.md, cost): it runs on a worker thread,
one call at a time, so the event loop keeps serving the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgpack
import numpy as np

from edge_agent.files import atomic_write
from edge_agent.secure_rounds import is_secure
from fedge_contract import DecodeError, GlobalModel
from fedge_contract.aio import ThreadMeter
from fedge_contract.chunks import Manifest
from fedge_contract.errors import Reason
from fedge_contract.messages import pack_weights, unpack_weights
from fedge_contract.secagg import (
    DevicePolicy,
    DeviceSession,
    KeyAdvert,
    KeyList,
    MaskedInput,
    ParameterError,
    ProtocolError,
    Reveal,
    ServerMessage,
    Setup,
    ShareBundle,
    Shares,
    UnmaskRequest,
)
from fedge_contract.secagg.announcement import SecureRound
from fedge_contract.secagg.crypto import Randomness
from fedge_contract.secagg.topics import SecAggTopics
from fedge_contract.tensors import ModelSpec

R = TypeVar("R")
log = logging.getLogger("fedge.agent.secagg")
_ENCODE_STREAM = 0x5EC466  # separates the fixed-point rounding's random stream from training's
_JOURNAL_LENGTH = 64  # session ids remembered: far more than the retries of any one round
_SERVER_KINDS: dict[str, type[KeyList | ShareBundle | UnmaskRequest]] = {
    "keys": KeyList, "bundle": ShareBundle, "unmask": UnmaskRequest,
}


class Publisher(Protocol):
    """What the module publishes through (fedge_contract.mqtt.Connection is one)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...


@dataclass
class SecureStats:
    joined: int = 0  # sessions this device advertised keys in
    revealed: int = 0  # sessions it finished (answered the unmask request)
    sat_out: list[str] = field(default_factory=list)  # why it left sessions, in order
    crypto_seconds: float = 0.0  # CPU seconds of the session's work (thread time): keys, shares, masking, reveals
    bytes_up: int = 0  # protocol payloads published (resends included)
    bytes_down: int = 0  # protocol payloads received


@dataclass(frozen=True)
class TrainedInput:
    """A delta waiting to be counted in a secure round: this device's own data, kept on its own disk."""

    round: int
    base_version: int
    num_samples: int
    delta: dict[str, np.ndarray]

    def flat(self, spec: ModelSpec) -> np.ndarray:
        return np.concatenate([np.asarray(self.delta[t.name], dtype=np.float32).ravel() for t in spec.tensors])

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb({
            "round": self.round, "base_version": self.base_version, "num_samples": self.num_samples,
            "weights": pack_weights(self.delta),
        }, use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, blob: bytes, spec: ModelSpec) -> TrainedInput:
        """ValueError (or DecodeError) for a file that is not a complete input for ``spec``."""
        obj = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        if not isinstance(obj, dict) or not isinstance(obj.get("weights"), bytes):
            raise ValueError("not a trained input")
        numbers = [obj.get(key) for key in ("round", "base_version", "num_samples")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError("round, base_version and num_samples must be integers >= 0")
        delta = unpack_weights(obj["weights"])
        if ModelSpec.of(delta).fingerprint != spec.fingerprint:
            raise ValueError("its tensors are not this task's model")
        return cls(round=obj["round"], base_version=obj["base_version"], num_samples=obj["num_samples"], delta=delta)


class Journal:
    """The sessions this device joined (ids only, no secrets), on disk before the advert leaves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sessions: list[str] = []
        try:
            loaded = json.loads(path.read_text())
            self.sessions = [s for s in loaded["sessions"] if isinstance(s, str)][-_JOURNAL_LENGTH:]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, RecursionError):
            # Unreadable: worst case a restarted device joins a session it had joined, and its
            # neighbours refuse its new shares (unauthentic); never a reused seed: seeds are fresh.
            log.warning("ignoring unreadable session journal %s", path)

    def __contains__(self, session: object) -> bool:
        return session in self.sessions

    def add(self, session: str) -> None:
        self.sessions = [*self.sessions, session][-_JOURNAL_LENGTH:]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"sessions": self.sessions}).encode())


class SecureAggregation:
    """One device's secure-aggregation sessions; the agent owns it and feeds it from its one loop.

    ``subscriptions()`` are added to the agent's connection, ``attach`` gives it the connection and
    the model's spec, ``on_message`` takes what arrives on them, ``on_announcement`` every global
    model, ``submit`` the trained delta of a secure round (``is_secure``).
    """

    def __init__(
        self,
        *,
        fleet: str,
        client_id: str,
        state_dir: Path,
        max_message_bytes: int,
        seed: int = 0,
        policy: DevicePolicy | None = None,
        random: Randomness = os.urandom,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client_id = client_id
        self.topics = SecAggTopics(fleet)
        self.max_message_bytes = max_message_bytes
        self.seed = seed
        self.policy = policy or DevicePolicy()
        self.stats = SecureStats()
        self.submitted: dict[str, np.ndarray] = {}  # session -> the ring vector this device put in (its own input; the last 4)
        self._random = random
        self._on_change = on_change
        self._dir = state_dir / "secagg"
        self._journal = Journal(self._dir / "sessions.json")
        self._input_path = self._dir / "input.bin"
        self._publisher: Publisher | None = None
        self._spec: ModelSpec | None = None
        self._round: int | None = None  # the round announced last
        self._secure: SecureRound | None = None  # its parameters, when it is secure
        self._waiting: Setup | None = None  # a Setup for a round not announced (yet)
        self._session: DeviceSession | None = None
        self._input: TrainedInput | None = None
        self._chunked: dict[str, int] = {}  # session -> chunks of its masked input published retained
        self._left: set[str] = set()  # sessions sat out or finished in this run: not rejoined, not reported twice
        self._status = ""  # why the last session was sat out ("" when none): presence shows it
        self._lock = asyncio.Lock()  # one protocol step at a time: dispatch and training both call in
        self._meter = ThreadMeter()

    # ---------------------------------------------------------------- wiring

    def subscriptions(self) -> list[str]:
        return self.topics.for_device(self.client_id)

    def owns(self, topic: str) -> bool:
        return topic in self.subscriptions()

    def attach(self, publisher: Publisher, spec: ModelSpec) -> None:
        """Publish through ``publisher``; inputs are deltas of ``spec``. Reloads a trained input kept on disk."""
        self._publisher, self._spec = publisher, spec
        self._input = self._load_input(spec)

    def presence_fields(self) -> dict[str, str]:
        """For presence's ``device`` map: why the last session was sat out, if it was."""
        return {"secagg": self._status} if self._status else {}

    @property
    def session(self) -> DeviceSession | None:
        return self._session

    # ---------------------------------------------------------------- from the agent

    async def on_announcement(self, model: GlobalModel) -> None:
        """A global model arrived: note its round and whether it is secure; a newer round ends older sessions."""
        async with self._lock:
            try:
                secure = SecureRound.of(model.task)
            except DecodeError as exc:
                secure = None
                if is_secure(model):
                    await self._report(f"round {model.round}: the announcement's secure-aggregation parameters are unusable: {exc}")
            if self._round is not None and model.round > self._round and self._session is not None:
                await self._clear_chunks(self._session.setup.session)
                self._session = None  # a newer round: whatever session was running is over
            self._round, self._secure = model.round, secure
            if self._input is not None and self._input.round < model.round:
                self._input = None
                await asyncio.to_thread(self._input_path.unlink, missing_ok=True)
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                await self._on_setup(waiting)

    async def submit(self, model: GlobalModel, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        """The trained delta of secure round ``model.round``: kept on disk, counted by the round's session(s)."""
        trained = TrainedInput(model.round, model.model_version, num_samples, {k: np.asarray(v, np.float32) for k, v in delta.items()})
        await asyncio.to_thread(self._save_input, trained)
        async with self._lock:
            self._input = trained
            if self._session is not None and self._session.setup.round == trained.round:
                await self._submit_input(self._session)

    async def on_message(self, topic: str, payload: bytes) -> None:
        """One message on a topic of ``subscriptions()``."""
        if not payload:
            return  # a retained message cleared at a session's end
        self.stats.bytes_down += len(payload)
        async with self._lock:
            if topic == self.topics.setup:
                try:
                    setup = Setup.from_bytes(payload, fleet=self.topics.fleet)
                except DecodeError as exc:
                    log.warning("%s: unreadable secure-aggregation setup: %s", self.client_id, exc)
                    return
                await self._on_setup(setup)
                return
            kind = _SERVER_KINDS[topic.split("/")[4]]
            try:
                message = kind.from_bytes(payload, fleet=self.topics.fleet)
            except DecodeError as exc:
                log.warning("%s: unreadable %s: %s", self.client_id, kind.TYPE, exc)
                return
            await self._on_server_message(message)

    # ---------------------------------------------------------------- protocol

    async def _on_setup(self, setup: Setup) -> None:
        session = self._session
        if session is not None and setup.session == session.setup.session:
            await self._answer(session, setup)  # re-delivered (a reconnect): the same advert again
            return
        if self.client_id not in setup.cohort or setup.session in self._left:
            return
        if self._round is None or setup.round > self._round:
            self._waiting = setup  # its announcement has not arrived yet
            return
        if setup.round < self._round or self._secure is None:
            return  # an older round's, or a round this device was not told is secure
        if setup.session in self._journal:
            await self._sit_out(setup, "this device joined the session before a restart; its keys were held in memory only")
            return
        assert self._spec is not None
        expected = self._spec.num_parameters + 1
        if setup.length != expected:
            await self._sit_out(setup, f"{Reason.SHAPE_MISMATCH.value}: the session sums {setup.length} coordinates, "
                                       f"this device's model gives {expected} (parameters + the weight)")
            return
        try:
            session = await self._work(DeviceSession, setup, self.client_id, random=self._random, policy=self.policy)
        except ProtocolError as exc:
            await self._sit_out(setup, str(exc))
            return
        await asyncio.to_thread(self._journal.add, setup.session)  # on disk before the keys leave
        self._session = session
        self._status = ""
        self.stats.joined += 1
        log.info("%s: joined secure-aggregation session %s of round %d (%d invited)", self.client_id, setup.session, setup.round,
                 len(setup.cohort), extra={"client": self.client_id, "round": setup.round, "session": setup.session})
        await self._publish(session.advertisement())
        if self._input is not None and self._input.round == setup.round:
            await self._submit_input(session)

    async def _on_server_message(self, message: KeyList | ShareBundle | UnmaskRequest) -> None:
        session = self._session
        if session is None or message.session != session.setup.session:
            return  # a stale retained message of another session, or one this device is not (or no longer) in
        await self._answer(session, message)

    async def _answer(self, session: DeviceSession, message: ServerMessage) -> None:
        try:
            reply = await self._work(session.handle, message)
        except ProtocolError as exc:
            await self._sit_out(session.setup, str(exc))
            return
        if reply is not None:
            await self._publish(reply)
        if isinstance(reply, Reveal):
            await self._finish(session)

    async def _submit_input(self, session: DeviceSession) -> None:
        trained, secure = self._input, self._secure
        assert trained is not None
        if secure is None:
            await self._sit_out(session.setup, "the round's announcement carries no usable secure-aggregation parameters")
            return
        setup = session.setup
        rng = np.random.default_rng([self.seed, zlib.crc32(self.client_id.encode()), setup.round, _ENCODE_STREAM])
        assert self._spec is not None
        try:
            vector = await self._work(self._encode, setup, secure, trained, rng)
            masked = await self._work(session.submit, vector)
        except ParameterError as exc:
            await self._sit_out(setup, f"its input cannot be encoded: {exc}")
            return
        self.submitted = {**dict(list(self.submitted.items())[-3:]), setup.session: vector}
        if masked is not None:
            await self._publish(masked)

    def _encode(self, setup: Setup, secure: SecureRound, trained: TrainedInput, rng: np.random.Generator) -> np.ndarray:
        assert self._spec is not None
        weighting = secure.weighting(setup.clip)
        return setup.fixed_point.encode(weighting.vector(secure.bounded(trained.flat(self._spec)), max(trained.num_samples, 1)), rng)

    async def _finish(self, session: DeviceSession) -> None:
        setup = session.setup
        if setup.session in self._left:
            return
        self._left.add(setup.session)
        self.stats.revealed += 1
        log.info("%s: answered the unmask request of session %s (round %d)", self.client_id, setup.session, setup.round,
                 extra={"client": self.client_id, "round": setup.round, "session": setup.session})
        await self._clear_chunks(setup.session)

    async def _sit_out(self, setup: Setup, reason: str) -> None:
        if self._session is not None and self._session.setup.session == setup.session:
            self._session = None
        if setup.session in self._left:
            return
        self._left.add(setup.session)
        await self._report(f"sat out session {setup.session} of round {setup.round}: {reason}")
        await self._clear_chunks(setup.session)

    async def _report(self, status: str) -> None:
        self._status = status[:240]
        self.stats.sat_out.append(status)
        log.warning("%s: %s", self.client_id, status, extra={"client": self.client_id})
        if self._on_change is not None:
            await self._on_change()

    # ---------------------------------------------------------------- I/O

    async def _work(self, function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``function`` on a worker thread (the crypto); its CPU time counts in ``stats.crypto_seconds``."""
        result = await self._meter.run(function, *args, **kwargs)
        self.stats.crypto_seconds = self._meter.seconds
        return result

    async def _publish(self, message: KeyAdvert | Shares | MaskedInput | Reveal) -> None:
        assert self._publisher is not None
        topic = self.topics.device(type(message), self.client_id)
        payload = message.to_bytes()
        if isinstance(message, MaskedInput) and len(payload) > self.max_message_bytes:
            manifest = Manifest.of(payload, fleet=self.topics.fleet, kind="update", chunk_size=self.max_message_bytes,
                                   client_id=self.client_id, update_id=message.session)
            base = self.topics.masked_chunks(self.client_id, message.session)
            self._chunked[message.session] = manifest.count
            for index in range(manifest.count):  # retained, then the manifest: whoever sees it finds them
                piece = payload[index * manifest.chunk_size : (index + 1) * manifest.chunk_size]
                await self._publisher.publish(f"{base}/{index}", piece, retain=True)
                self.stats.bytes_up += len(piece)
            payload = manifest.to_bytes()
        await self._publisher.publish(topic, payload)
        self.stats.bytes_up += len(payload)

    async def _clear_chunks(self, session: str) -> None:
        count = self._chunked.pop(session, 0)
        if count and self._publisher is not None:
            base = self.topics.masked_chunks(self.client_id, session)
            for index in range(count):
                await self._publisher.publish(f"{base}/{index}", b"", retain=True)

    def _save_input(self, trained: TrainedInput) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self._input_path, trained.to_bytes())

    def _load_input(self, spec: ModelSpec) -> TrainedInput | None:
        try:
            blob = self._input_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return TrainedInput.from_bytes(blob, spec)
        except (ValueError, DecodeError, msgpack.UnpackException) as exc:
            log.warning("%s: ignoring unreadable secure-aggregation input %s: %s", self.client_id, self._input_path, exc)
            return None

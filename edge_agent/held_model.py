"""The model a device holds under delta broadcasts (issue 16): follow, catch up, persist.

An aggregator with delta broadcasts announces each version as a GlobalDelta (fedge_contract.broadcast)
that only makes sense against the model the device already holds. The Follower keeps that model in
a contract Rebuilder and turns every announcement into one of:

- ``Ready``: the device holds the announced version, bit for bit (its hash checked), and the
  announcement's task is known; ``Ready.model`` is what the agent trains from (a full float32
  GlobalModel of the held weights) and computes its delta against (base_version = that version);
- ``Failed``: the version cannot be reached now, with the DecodeError that says why (the agent
  logs it, shows it in its presence and trains on nothing until the next announcement);
- nothing yet: a catch-up is under way.

Catch-up. A delta that does not apply (``base_mismatch``: the device missed versions, is new, or
restarted) is bridged from the retained topics: the missing deltas (``global/delta/<u>``) when the
device holds a version since the keyframe, else the keyframe (``global/key``) and the deltas after
it. A delta that is malformed or whose rebuild does not match its hash is refused with its reason
and the device falls back to the full model: the keyframe and the retained deltas *including the
announced version's retained copy* (so a damaged announcement is replaced by its copy). A catch-up
that fails its hashes again, or whose topics stay silent for ``timeout`` seconds, is ``Failed``.
The Follower subscribes to exactly the topics its plan needs, unsubscribes from each as soon as its
retained message arrived, and fetches large ones as chunks (manifest kinds ``keyframe`` and
``delta``, fedge_contract.transfer), at most one at a time.

The task. A GlobalDelta names its TaskConfig by ``task_id`` and carries it only when it changed;
the Follower keeps the last task it saw and fetches ``global/task`` when an announcement names
another one.

Persistence (``HeldFiles``): the held model and the task are kept in
``<state_dir>/held-<fingerprint>.state`` (msgpack of plain values, never pickle, written atomically
on the agent's disk thread), so a restarted device needs only the deltas it missed. A state file
that is corrupt or another model's is ignored with a warning: the device catches up from the keyframe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import msgpack
import numpy as np

from edge_agent.files import atomic_write
from fedge_contract import DecodeError, GlobalModel, Reason, TaskConfig, Topics
from fedge_contract.broadcast import CatchUp, GlobalDelta, GlobalTask, Held, Rebuilder, task_id
from fedge_contract.chunks import ChunkLimits, Manifest, is_manifest
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import Connection
from fedge_contract.tensors import ModelSpec
from fedge_contract.transfer import WAKE_TOPIC, ChunkReceiver, Received, Refused

__all__ = ["Failed", "Follower", "HeldFiles", "HeldStats", "Ready", "training_model"]

log = logging.getLogger("fedge.agent.held")

Announced = GlobalModel | GlobalDelta
STATE_FORMAT = 1
_FLOAT32 = parse_chain("none")


def training_model(announcement: Announced, held: Held, task: TaskConfig) -> GlobalModel:
    """What the agent trains from: the announcement's round, deadline and task, the held weights in float32."""
    return GlobalModel(
        fleet=announcement.fleet, model_version=held.version, round=announcement.round, deadline=announcement.deadline,
        task=task, fingerprint=announcement.fingerprint, tensors=encode_weights(dict(held.weights), _FLOAT32),
        final=announcement.final, held_hash=held.digest, cohort=announcement.cohort,
    )


@dataclass(frozen=True)
class Ready:
    """The device holds ``announcement``'s version; ``model`` is what to train from."""

    announcement: Announced
    held: Held
    task: TaskConfig

    @property
    def model(self) -> GlobalModel:
        return training_model(self.announcement, self.held, self.task)


@dataclass(frozen=True)
class Failed:
    """``announcement``'s version cannot be reached now (``error`` says why); the held model is unchanged."""

    announcement: Announced
    error: DecodeError


@dataclass
class HeldStats:
    accepted: int = 0  # announcements applied directly (a delta, a hold, a full model)
    caught_up: int = 0  # versions reached by a catch-up
    fell_back: int = 0  # catch-ups from the keyframe after a refused delta (malformed, hash mismatch)
    failed: int = 0  # versions given up on
    bytes: int = 0  # downloaded for catch-up and the task (keyframes, retained deltas, chunks, global/task)
    refusals: list[str] = field(default_factory=list)  # the reason of each refusal, oldest first (the last 64)

    def refused(self, error: DecodeError) -> None:
        self.refusals.append(error.reason.value)
        del self.refusals[:-64]  # an agent runs for months: keep the recent ones


# ---------------------------------------------------------------------- persistence
class HeldFiles:
    """``<state_dir>/held-<fingerprint>.state``: the held model and the last task, as plain msgpack."""

    def __init__(self, directory: Path, spec: ModelSpec) -> None:
        self.directory = directory
        self.spec = spec
        self._saved: tuple[int, bytes] | None = None  # (version, digest) on disk

    @property
    def path(self) -> Path:
        return self.directory / f"held-{self.spec.fingerprint}.state"

    def load(self) -> tuple[Rebuilder, TaskConfig | None] | None:
        """The kept model and task, or None (no file, or one that is corrupt or another model's: logged)."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            obj = msgpack.unpackb(blob, raw=False, strict_map_key=True)
            if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
                raise DecodeError(Reason.SCHEMA, f"held state format {obj.get('format') if isinstance(obj, dict) else None!r}")
            rebuilder = Rebuilder.from_state(obj.get("rebuilder"), self.spec)
            task = TaskConfig.from_wire(obj["task"]) if obj.get("task") is not None else None
        except (DecodeError, ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            log.warning("ignoring the held model in %s (%s): catching up from the broadcasts instead", self.path, exc)
            return None
        if rebuilder.held is not None:
            self._saved = (rebuilder.held.version, rebuilder.held.digest)
        return rebuilder, task

    def save(self, rebuilder: Rebuilder, task: TaskConfig | None) -> bool:
        """Write the model held now (atomically), unless it is already on disk; other models' files go."""
        held = rebuilder.held
        if held is None or self._saved == (held.version, held.digest):
            return False
        state = {"format": STATE_FORMAT, "rebuilder": rebuilder.to_state(), "task": None if task is None else task.to_wire()}
        atomic_write(self.path, msgpack.packb(state, use_bin_type=True))
        self._saved = (held.version, held.digest)
        for other in self.directory.glob("held-*.state"):
            if other != self.path:
                other.unlink(missing_ok=True)
        return True


# ---------------------------------------------------------------------- following the broadcasts
@dataclass
class _Episode:
    """One catch-up: the announcement to reach and what was fetched for it so far."""

    target: Announced
    plan: CatchUp | None  # None: the weights are there, only the task is missing
    held: Held | None = None  # the weights reached (when only the task was missing)
    own_copy: bool = False  # the plan also fetches the target's retained copy (its announcement was refused)
    keyframe: GlobalModel | None = None
    deltas: dict[int, GlobalDelta] = field(default_factory=dict)
    task: TaskConfig | None = None
    fallback: bool = False
    deadline: float = 0.0


class Follower:
    """Keeps one device's held model in step with the aggregator's broadcasts (see the module docstring).

    Lives in the agent's message loop with no task of its own: ``offer`` takes each announcement,
    ``handle`` each message on a topic it ``owns``; both return the versions that became ready or
    failed. Rebuilds run on a worker thread (a 10M-parameter delta takes ~50 ms), one at a time.
    """

    def __init__(
        self,
        conn: Connection,
        topics: Topics,
        rebuilder: Rebuilder,
        *,
        task: TaskConfig | None = None,
        max_bytes: int,
        timeout: float = 120.0,
        stats: HeldStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.topics = topics
        self.rebuilder = rebuilder
        self.task = task  # the last task seen (inline, or from global/task)
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.clock = clock
        self.stats = stats or HeldStats()
        limits = ChunkLimits(max_size=max_bytes, max_concurrent=1, max_inflight_bytes=max_bytes, timeout=timeout)
        self._chunks = ChunkReceiver(conn, topics, limits, bad_chunk="skip")
        self._episode: _Episode | None = None
        self._subscribed: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._prefixes = (f"{topics.global_keyframe}", f"{topics.global_model}/delta/")

    @property
    def held(self) -> Held | None:
        return self.rebuilder.held

    @property
    def catching_up(self) -> bool:
        return self._episode is not None

    def owns(self, topic: str) -> bool:
        """A catch-up topic (keyframe, retained deltas, the task, their chunks) or a chunk timer's wake-up."""
        return topic == WAKE_TOPIC or topic == self.topics.global_task or topic.startswith(self._prefixes)

    def close(self) -> None:
        self._chunks.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ announcements
    async def offer(self, message: Announced) -> list[Ready | Failed]:
        """An announcement from ``global``: apply it, or start (or re-aim) a catch-up."""
        if isinstance(message, GlobalModel) and message.held_hash is None:
            raise ValueError("a plain full model (no held_hash) is not a delta broadcast: the agent trains on it as before")
        task = self._task_of(message)
        try:
            held = await asyncio.to_thread(self.rebuilder.accept, message)
        except DecodeError as exc:
            return await self._refused(message, exc, task)
        self.stats.accepted += 1
        if task is not None:
            await self._end()
            return [Ready(message, held, task)]
        return await self._start(_Episode(message, None, held=held))

    def _task_of(self, message: Announced) -> TaskConfig | None:
        """The announcement's task: inline (then kept), or the kept one if the id names it, else None (fetch it)."""
        if message.task is not None:
            self.task = message.task
            return message.task
        if isinstance(message, GlobalDelta) and self.task is not None and task_id(self.task) == message.task_id:
            return self.task
        return None

    async def _refused(self, message: Announced, error: DecodeError, task: TaskConfig | None) -> list[Ready | Failed]:
        self.stats.refused(error)
        gap = error.reason is Reason.BASE_MISMATCH
        plan = self.rebuilder.recovery(message, error)
        own_copy = False
        if plan is not None and not gap and isinstance(message, GlobalDelta) and message.model_version > message.keyframe_version:
            # the announcement itself may be what is wrong: fetch its retained copy too, and rebuild that
            plan, own_copy = CatchUp(plan.keyframe, (*plan.deltas, message.model_version)), True
        what = f"v{message.model_version}"
        if plan is None:
            log.error("refused broadcast %s (%s); nothing to catch up from until the next announcement", what, error)
            return await self._fail(message, error)
        if gap:
            log.info("broadcast %s: %s; catching up: %s", what, error.detail, _describe(plan))
        else:
            self.stats.fell_back += 1
            log.warning("refused broadcast %s (%s); falling back to the full model: %s", what, error, _describe(plan))
        episode = _Episode(message, plan, own_copy=own_copy, fallback=not gap)
        previous = self._episode
        if previous is not None:  # keep what an earlier catch-up already fetched
            episode.keyframe, episode.deltas = previous.keyframe, previous.deltas
        episode.task = task
        return await self._start(episode)

    # ------------------------------------------------------------------ catch-up
    async def _start(self, episode: _Episode) -> list[Ready | Failed]:
        self._episode = episode
        if episode.task is None:
            episode.task = self._task_of(episode.target)
        wanted = set(self._missing(episode))
        for topic in sorted(self._subscribed - wanted):
            await self._unsubscribe(topic)
        episode.deadline = self.clock() + self.timeout
        for topic in sorted(wanted - self._subscribed):
            self._subscribed.add(topic)
            await self.conn.subscribe(topic)  # the broker sends the retained message
        self._arm()
        return await self._advance()

    def _missing(self, episode: _Episode) -> list[str]:
        """The topics whose retained message the episode still needs."""
        topics = [] if episode.task is not None else [self.topics.global_task]
        plan = episode.plan
        if plan is None:
            return topics
        if plan.keyframe is not None and (episode.keyframe is None or episode.keyframe.model_version != plan.keyframe):
            topics.append(self.topics.global_keyframe)
        topics += [self.topics.global_delta(u) for u in plan.deltas if u not in episode.deltas]
        return topics

    async def handle(self, topic: str, payload: bytes) -> list[Ready | Failed]:
        """A message on a topic this Follower ``owns`` (or its chunk timer's wake-up)."""
        if topic != WAKE_TOPIC:
            self.stats.bytes += len(payload)
        outcomes: list[Ready | Failed] = []
        if topic == WAKE_TOPIC or self.topics.chunk_of(topic) is not None:
            for done in await self._chunks.handle(topic, payload):
                outcomes += await self._fetched(done)
            if topic == WAKE_TOPIC:
                outcomes += await self._expire()
            return outcomes
        episode = self._episode
        if episode is None or topic not in self._subscribed:
            if topic in self._subscribed or (episode is None and payload):
                await self._unsubscribe(topic)  # left from an earlier run (persistent session), or no longer needed
            return outcomes
        if not payload:
            return outcomes  # a retained message being cleared (a retired delta): not the one we wait for
        try:
            if topic == self.topics.global_task:
                task = GlobalTask.from_bytes(payload, max_bytes=self.max_bytes, fleet=self.topics.fleet).task
                await self._unsubscribe(topic)
                return await self._got_task(task)
            if is_manifest(payload):
                manifest = Manifest.from_bytes(payload, max_size=self.max_bytes, fleet=self.topics.fleet)
                expected = "keyframe" if topic == self.topics.global_keyframe else "delta"
                if manifest.kind != expected:
                    raise DecodeError(Reason.BAD_VALUE, f"a {manifest.kind} manifest on {topic}")
                await self._unsubscribe(topic)
                await self._chunks.offer(manifest)
                return outcomes
            await self._unsubscribe(topic)
            return await self._store(topic, payload)
        except DecodeError as exc:
            return await self._episode_failed(exc)

    async def _fetched(self, outcome: Received | Refused) -> list[Ready | Failed]:
        if self._episode is None:
            return []
        if isinstance(outcome, Refused):
            return await self._episode_failed(outcome.error)
        manifest = outcome.manifest
        assert manifest.model_version is not None
        topic = self.topics.global_keyframe if manifest.kind == "keyframe" else self.topics.global_delta(manifest.model_version)
        try:
            return await self._store(topic, outcome.payload)
        except DecodeError as exc:
            return await self._episode_failed(exc)

    async def _store(self, topic: str, payload: bytes) -> list[Ready | Failed]:
        episode = self._episode
        assert episode is not None
        if topic == self.topics.global_keyframe:
            keyframe = GlobalModel.from_bytes(payload, max_bytes=self.max_bytes, fleet=self.topics.fleet)
            episode.keyframe = keyframe
            if episode.plan is not None and episode.plan.keyframe is not None and keyframe.model_version != episode.plan.keyframe:
                raise DecodeError(Reason.BAD_VALUE, f"catch-up needs keyframe v{episode.plan.keyframe}; global/key holds "
                                                    f"v{keyframe.model_version} (a newer announcement will say what to fetch)")
        else:
            delta = GlobalDelta.from_bytes(payload, max_bytes=self.max_bytes, fleet=self.topics.fleet)
            episode.deltas[delta.model_version] = delta
        episode.deadline = self.clock() + self.timeout
        self._arm()
        return await self._advance()

    async def _got_task(self, task: TaskConfig) -> list[Ready | Failed]:
        episode = self._episode
        assert episode is not None
        if not isinstance(episode.target, GlobalDelta) or task_id(task) != episode.target.task_id:
            # the task moved on since this announcement: the next one names (or carries) the new task
            error = DecodeError(Reason.BAD_VALUE, f"global/task holds another task than v{episode.target.model_version} names")
            self.stats.refused(error)
            log.warning("catch-up to v%d: %s; waiting for the next announcement", episode.target.model_version, error)
            return await self._fail(episode.target, error)
        self.task = episode.task = task
        return await self._advance()

    async def _advance(self) -> list[Ready | Failed]:
        """Rebuild once everything the episode needs is here."""
        episode = self._episode
        if episode is None or self._missing(episode) or self._chunks.keys():
            return []
        if episode.plan is not None:
            target: Announced = episode.target
            plan = episode.plan
            if episode.own_copy:  # rebuild the retained copy of the refused announcement
                *before, last = plan.deltas
                target, plan = episode.deltas[last], CatchUp(plan.keyframe, tuple(before))
            try:
                held = await asyncio.to_thread(self.rebuilder.catch_up, target, plan, episode.keyframe, episode.deltas)
            except DecodeError as exc:
                return await self._episode_failed(exc)
            episode.held = held
            self.stats.caught_up += 1
            log.info("caught up to v%d (%s)", held.version, _describe(episode.plan))
        assert episode.held is not None and episode.task is not None
        await self._end()
        return [Ready(episode.target, episode.held, episode.task)]

    async def _episode_failed(self, error: DecodeError) -> list[Ready | Failed]:
        """What the episode fetched did not work: the next plan (the keyframe), or give up."""
        episode = self._episode
        assert episode is not None
        self.stats.refused(error)
        plan = None if episode.plan is None else self.rebuilder.recovery(episode.target, error, episode.plan)
        if plan is None:
            log.error("catch-up to v%d failed (%s); waiting for the next announcement", episode.target.model_version, error)
            return await self._fail(episode.target, error)
        log.warning("catch-up to v%d: %s; falling back to the full model: %s", episode.target.model_version, error, _describe(plan))
        self.stats.fell_back += 1
        if episode.own_copy:
            plan = CatchUp(plan.keyframe, (*plan.deltas, episode.target.model_version))
        # what was fetched stays: retained topics hold the same bytes, and the keyframe path needs them too
        retry = _Episode(episode.target, plan, own_copy=episode.own_copy, keyframe=episode.keyframe, deltas=episode.deltas,
                         task=episode.task, fallback=True)
        return await self._start(retry)

    async def _expire(self) -> list[Ready | Failed]:
        episode = self._episode
        if episode is None or self.clock() < episode.deadline:
            self._arm()
            return []
        missing = ", ".join(self._missing(episode) + self._chunks.keys()) or "nothing"
        version = episode.target.model_version
        error = DecodeError(Reason.INCOMPLETE, f"catch-up to v{version}: no message for {self.timeout:g}s (waiting for {missing})")
        return await self._episode_failed(error)

    async def _fail(self, message: Announced, error: DecodeError) -> list[Ready | Failed]:
        self.stats.failed += 1
        await self._end()
        return [Failed(message, error)]

    async def _end(self) -> None:
        self._episode = None
        for key in self._chunks.keys():
            await self._chunks.cancel(key)
        for topic in sorted(self._subscribed):
            await self._unsubscribe(topic)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _unsubscribe(self, topic: str) -> None:
        self._subscribed.discard(topic)
        with contextlib.suppress(ValueError):
            await self.conn.unsubscribe(topic)

    def _arm(self) -> None:
        """Wake the loop (the chunk receiver's marker message) when the episode's deadline passes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._episode is not None:
            delay = max(0.0, self._episode.deadline - self.clock()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self.conn.messages.put_nowait(aiomqtt.Message(WAKE_TOPIC, b"", 0, False, 0, None))


def _describe(plan: CatchUp) -> str:
    parts = [] if plan.keyframe is None else [f"keyframe v{plan.keyframe}"]
    if plan.deltas:
        first, last = plan.deltas[0], plan.deltas[-1]
        parts.append(f"delta v{first}" if first == last else f"deltas v{first}-v{last}")
    return " + ".join(parts) or "nothing"


def initial_rebuilder(spec: ModelSpec, kept: tuple[Rebuilder, TaskConfig | None] | None,
                      build: Mapping[str, np.ndarray] | None) -> tuple[Rebuilder, TaskConfig | None]:
    """The device's starting point: its kept model, else its own build of version 0, else nothing."""
    if kept is not None:
        return kept
    if build is not None:
        return Rebuilder.from_build(spec, build), None
    return Rebuilder(spec), None

"""Building blocks for secure aggregation over a real Mosquitto: a test loop standing in for the
coordinator (one connection, one SecAggRelay, a spool and checkpoints kept as a store would keep
them), and devices that run the agent's secure-aggregation module on connections of their own.

A device can be *lost* right after it published a given message (its connection closes, it never
answers again), which is how the dropout tests place a loss at an exact phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from aggregator.secagg_relay import Refusal, SecAggRelay, SecAggSettings
from edge_agent.secure_aggregation import SecureAggregation
from fedge_contract import GlobalModel, TaskConfig
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES
from fedge_contract.mqtt import Backoff, BrokerAddress, Connection
from fedge_contract.secagg import DeviceMessage, PhaseTimeouts
from fedge_contract.secagg.topics import SecAggTopics
from fedge_contract.tensors import ModelSpec

SPEC = ModelSpec.of({"w": np.zeros((20, 8), np.float32), "b": np.zeros(8, np.float32)})  # 168 parameters
# Phases end early once everyone expected answered; these deadlines only cost time where a test loses devices.
TIMEOUTS = PhaseTimeouts(advertise=6.0, share=6.0, mask=8.0, unmask=6.0)


class DeviceLost(Exception):
    """Raised by a device's publisher once the message it was to be lost after has left."""


@dataclass
class Store:
    """What the coordinator persists: masked inputs (the spool) and checkpoints, as bytes on 'disk'."""

    spool: dict[str, list[bytes]] = field(default_factory=dict)  # session -> masked input payloads, in arrival order
    checkpoints: list[bytes] = field(default_factory=list)

    async def put_masked(self, session: str, client_id: str, payload: bytes) -> None:
        self.spool.setdefault(session, []).append(payload)

    async def put_checkpoint(self, snapshot: dict[str, Any]) -> None:
        self.checkpoints.append(msgpack.packb(snapshot, use_bin_type=True))

    def last_checkpoint(self) -> dict[str, Any]:
        loaded: dict[str, Any] = msgpack.unpackb(self.checkpoints[-1], raw=False)
        return loaded

    def everything(self) -> bytes:
        """Every byte the aggregator stored."""
        return b"".join(p for payloads in self.spool.values() for p in payloads) + b"".join(self.checkpoints)


class Coordinator:
    """The coordinator's loop around a SecAggRelay: messages in, wake-ups on time, refusals collected."""

    def __init__(self, conn: Connection, relay: SecAggRelay, store: Store) -> None:
        self.conn, self.relay, self.store = conn, relay, store
        self.refusals: list[Refusal] = []

    async def run(self, until: Callable[[], bool] | None = None) -> None:
        """Until the relay has an outcome (or ``until()`` holds after a step)."""
        relay = self.relay
        done = until or (lambda: relay.outcome is not None)
        while not done():
            wake = relay.next_wake()
            try:
                async with asyncio.timeout(None if wake is None else max(0.0, wake - time.monotonic())):
                    message = await self.conn.messages.get()
            except TimeoutError:
                self.refusals += await relay.on_wake(now=time.monotonic())
                continue
            topic, payload = str(message.topic), message.payload
            if relay.owns(topic) and isinstance(payload, bytes):
                self.refusals += await relay.on_message(topic, payload, now=time.monotonic())


@contextlib.asynccontextmanager
async def coordinator(address: BrokerAddress, fleet: str, store: Store, *, settings: SecAggSettings | None = None,
                      spec: ModelSpec = SPEC, resume: bool = False, name: str = "coordinator") -> AsyncIterator[Coordinator]:
    """A connected coordinator; ``resume`` rebuilds its relay from the store's last checkpoint and spool."""
    settings = settings or SecAggSettings(timeouts=TIMEOUTS)
    relays: list[SecAggRelay] = []

    async def reconnected() -> None:  # what was retained or sent meanwhile may be lost: the current phase again
        if relays and conn.connections > 1:
            await relays[0].republish()

    async with Connection(address, f"{name}-{fleet}"[:64], subscriptions=[SecAggTopics(fleet).all_from_devices], persistent=False,
                          on_connect=reconnected, backoff=Backoff(0.1, 1.0)) as conn:
        await conn.wait_connected()
        if resume:
            snapshot = store.last_checkpoint()
            relay = await SecAggRelay.resume(
                snapshot, [p for payloads in store.spool.values() for p in payloads], fleet=fleet, transport=conn, spec=spec,
                spool=store.put_masked, checkpoint=store.put_checkpoint, now=time.monotonic(), settings=settings,
            )
        else:
            relay = SecAggRelay(fleet, conn, spec, spool=store.put_masked, checkpoint=store.put_checkpoint, settings=settings)
        relays.append(relay)
        yield Coordinator(conn, relay, store)


class _LosingPublisher:
    def __init__(self, conn: Connection, device: ModuleDevice) -> None:
        self.conn, self.device = conn, device

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self.conn.publish(topic, payload, retain=retain)
        self.device.published.append(topic)
        lose_after = self.device.lose_after
        if lose_after is not None and topic == self.device.topics.device(lose_after, self.device.client_id):
            raise DeviceLost(topic)


class ModuleDevice:
    """A device running the agent's secure-aggregation module (inputs are given, not trained)."""

    def __init__(self, address: BrokerAddress, fleet: str, client_id: str, state_dir: Path, *, spec: ModelSpec = SPEC,
                 lose_after: type[DeviceMessage] | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.address, self.client_id, self.spec, self.lose_after = address, client_id, spec, lose_after
        self.topics = SecAggTopics(fleet)
        self.secure = SecureAggregation(fleet=fleet, client_id=client_id, state_dir=state_dir, max_message_bytes=max_message_bytes)
        self.ready = asyncio.Event()
        self.lost = False
        self.published: list[str] = []

    async def run(self) -> None:
        async with Connection(self.address, f"device-{self.client_id}-{self.topics.fleet}"[:64], subscriptions=self.secure.subscriptions(),
                              persistent=False, backoff=Backoff(0.1, 1.0)) as conn:
            self.secure.attach(_LosingPublisher(conn, self), self.spec)
            await conn.wait_connected()
            self.ready.set()
            try:
                while True:
                    message = await conn.messages.get()
                    if isinstance(message.payload, bytes):
                        await self.secure.on_message(str(message.topic), message.payload)
            except DeviceLost:
                self.lost = True


def announcement(fleet: str, round_no: int, settings: SecAggSettings, spec: ModelSpec = SPEC) -> GlobalModel:
    """A secure round's global model, as far as the module reads it (round, version, the task's extra)."""
    task = TaskConfig(codec="none", extra=settings.announcement.to_extra())
    return GlobalModel(fleet, round_no - 1, round_no, None, task, spec.fingerprint, ())


def deltas(clients: Sequence[str], spec: ModelSpec = SPEC, seed: int = 0) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    """A float32 delta and a sample count per client, seeded."""
    rng = np.random.default_rng(seed)
    return {c: ({t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in spec.tensors}, int(rng.integers(10, 100)))
            for c in clients}


def fedavg(inputs: dict[str, tuple[dict[str, np.ndarray], int]], members: Sequence[str], spec: ModelSpec = SPEC) -> dict[str, np.ndarray]:
    total = sum(inputs[m][1] for m in members)
    return {t.name: sum(inputs[m][0][t.name].astype(np.float64) * (inputs[m][1] / total) for m in members) for t in spec.tensors}  # type: ignore[misc]


@contextlib.asynccontextmanager
async def running(devices: Sequence[ModuleDevice]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """The devices' loops, connected before the body starts, stopped after it."""
    tasks = [asyncio.create_task(d.run(), name=d.client_id) for d in devices]
    try:
        await asyncio.gather(*(d.ready.wait() for d in devices))
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def retained_under(address: BrokerAddress, fleet: str, pattern: str) -> list[str]:
    """The topics holding a retained message under ``pattern`` (a sentinel publish marks the end of the retained burst)."""
    sentinel = f"fl/{fleet}/secagg/probe-end"
    found: list[str] = []
    async with Connection(address, f"probe-{fleet}"[:64], subscriptions=[pattern, sentinel], persistent=False) as conn:
        await conn.wait_connected()
        await conn.publish(sentinel, b"end")
        while True:
            message = await conn.messages.get()
            if str(message.topic) == sentinel:
                return found
            if message.retain and message.payload:
                found.append(str(message.topic))

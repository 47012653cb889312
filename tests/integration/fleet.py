"""Building blocks for integration tests: configs for a small digits fleet and a raw MQTT peer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import Aggregator
from aggregator.broadcasting.broadcaster import Broadcaster
from aggregator.config import AggregatorConfig, config_of
from edge_agent import Agent, AgentConfig
from fedge_contract import GlobalModel, Receipt, RoundState, RoundStatus, Topics, Update
from fedge_contract.broadcast import GlobalDelta, decode_announcement, held_digest
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress, Client, make_client
from fedge_contract.tensors import ModelSpec

DIGITS_5 = {"clients": "5", "alpha": "0.5"}


@functools.cache
def digits_spec() -> ModelSpec:
    """The shapes of the digits model (what an update must have; a delta announcement's tensors are the encoded delta)."""
    from fedge_tasks import load_task
    from fedge_tasks.weights import get_weights

    return ModelSpec.of(get_weights(load_task("digits", DIGITS_5).build_model()))


def zero_update(fleet: str, client: str, update_id: str, round_no: int, base_version: int) -> Update:
    """A well-formed digits update that moves nothing (float32, 10 samples): what a raw peer sends when the
    test is about who may send, not what is learned."""
    delta = {t.name: np.zeros(t.shape, np.float32) for t in digits_spec().tensors}
    return Update(fleet, client, update_id, round_no, base_version, 10, encode_weights(delta, parse_chain("none")))


def check_held(agents: Iterable[Agent], broadcaster: Broadcaster) -> None:
    """Each agent holds the broadcaster's model: same version, same hash, same tensors, same bits."""
    for agent in agents:
        client = agent.config.client_id
        held = agent._following().held
        assert held is not None and held.version == broadcaster.version, client
        assert held.digest == broadcaster.held_hash, client
        assert set(held.weights) == set(broadcaster.held), client
        for name, values in broadcaster.held.items():
            assert np.asarray(held.weights[name]).tobytes() == np.asarray(values).tobytes(), (client, name)


def aggregator_config(address: BrokerAddress, fleet: str, store: Path, **overrides: Any) -> AggregatorConfig:
    settings: dict[str, Any] = dict(
        fleet=fleet, task="digits", task_options=DIGITS_5, rounds=3, target=5, min_updates=5, deadline=60.0, store=store,
    )
    settings.update(overrides)
    return config_of(address, **settings)


def agent_config(address: BrokerAddress, fleet: str, state_root: Path, index: int, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = dict(
        broker=address, client_id=f"agent-{index}", state_dir=state_root / f"agent-{index}", fleet=fleet,
        task="digits", task_options=DIGITS_5, exit_when_final=True, isolate_training=False, train_nice=0,
    )
    settings.update(overrides)
    return AgentConfig(**settings)


async def run_fleet(aggregator: Aggregator, agents: list[Agent]) -> None:
    """Run the aggregator to completion with its agents (which exit on the final model)."""
    async with asyncio.TaskGroup() as group:
        for agent in agents:
            group.create_task(agent.run())
        await aggregator.run()


class RawPeer:
    """A plain MQTT client playing a device that does not run fedge's agent (or a hostile one)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def next_payload(self, topic: str) -> bytes:
        async for message in self.client.messages:
            if str(message.topic) == topic and isinstance(message.payload, bytes) and message.payload:
                return message.payload
        raise AssertionError("connection closed")

    async def announcement(self, topics: Topics) -> GlobalModel | GlobalDelta:
        """The next announcement on ``global`` (a GlobalModel, or a GlobalDelta under delta broadcasts)."""
        return decode_announcement(await self.next_payload(topics.global_model), max_bytes=10**8)

    async def first_model(self, topics: Topics, task_options: dict[str, str] = DIGITS_5) -> GlobalModel:
        """Version 0 as a peer that trains sees it: a whole GlobalModel (--no-delta-broadcasts), or under delta
        broadcasts a hold, whose weights the peer builds from the task as every device does (checked by its hash)."""
        announced = await self.announcement(topics)
        if isinstance(announced, GlobalModel):
            return announced
        from fedge_tasks import load_task
        from fedge_tasks.weights import get_weights

        weights = get_weights(load_task("digits", task_options).build_model())  # as every device builds version 0
        assert announced.is_hold and announced.task is not None
        assert held_digest(weights, ModelSpec.of(weights)) == announced.held_hash, "the peer's build is not the aggregator's version 0"
        return GlobalModel(announced.fleet, 0, announced.round, announced.deadline, announced.task, announced.fingerprint,
                           encode_weights(weights, parse_chain("none")), held_hash=announced.held_hash)

    async def wait_open(self, topics: Topics, *, version: int) -> RoundStatus:
        """The status that opens the round trained on ``version`` (needs a subscription to status)."""
        while True:
            status = RoundStatus.from_bytes(await self.next_payload(topics.status))
            if status.model_version == version and status.state is RoundState.OPEN:
                return status

    async def receipt_list(self, count: int) -> list[Receipt]:
        """The next ``count`` receipts, in arrival order."""
        found: list[Receipt] = []
        async for message in self.client.messages:
            if "/receipts/" in str(message.topic):
                found.append(Receipt.from_bytes(message.payload))  # type: ignore[arg-type]
                if len(found) == count:
                    return found
        raise AssertionError("connection closed")

    async def receipts(self, count: int) -> dict[str | None, Receipt]:
        """The next ``count`` receipts, by update id."""
        return {r.update_id: r for r in await self.receipt_list(count)}


@asynccontextmanager
async def raw_peer(address: BrokerAddress, name: str, *topics: str) -> AsyncIterator[RawPeer]:
    async with make_client(address, name, persistent=False) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        yield RawPeer(client)


class ManualGate:
    """A device-conditions gate the test controls (a stand-in for unplugging a phone).

    ``passes`` lets that many trainings start, then the gate closes at the next one until the
    test calls ``open()``: no race with the timing of rounds.
    """

    def __init__(self, passes: int | None = None) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._passes = passes

    def open(self) -> None:
        self._passes = None
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def eligible(self) -> bool:
        return self._open.is_set()

    async def wait_eligible(self) -> None:
        if self._passes is not None:
            if self._passes == 0:
                self._open.clear()
            else:
                self._passes -= 1
        await self._open.wait()

    def why_not(self) -> str:
        return "" if self._open.is_set() else "closed by the test"


def run_fedge(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fedge ARGS`` in its own process group; on timeout kill the whole group, so a
    hung simulation's broker, aggregator and agents do not outlive the test."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fedge", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"fedge {' '.join(args)} did not finish in {timeout}s:\n{out}\n{err}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)

"""Real agents (digits, training in-process) in a secure round over a real Mosquitto, the relay driven by
a test loop standing in for the coordinator: the agents train, hand their deltas to the protocol and
never publish an Update; an agent restarted mid-session sits it out (the reason in its presence), the
session is abandoned for want of inputs, and the retried session counts every agent once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from aggregator.secagg_relay import SecAggSettings, SecureMean
from edge_agent import Agent
from fedge_contract import GlobalModel, Presence, TaskConfig, Topics
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress, Connection
from fedge_contract.secagg import Abandoned, Phase, Ring
from fedge_contract.tensors import ModelSpec
from tests.integration.fleet import agent_config
from tests.integration.secagg_fleet import TIMEOUTS, Store, coordinator

pytestmark = pytest.mark.integration
DIGITS_4 = {"clients": "4", "alpha": "0.5"}


def _digits_round(fleet: str, settings: SecAggSettings) -> tuple[GlobalModel, ModelSpec]:
    from fedge_tasks import load_task
    from fedge_tasks.weights import get_weights

    task = load_task("digits", DIGITS_4)
    weights = get_weights(task.build_model())
    spec = ModelSpec.of(weights)
    training = TaskConfig(**{**task.suggested_training(), "codec": "none", "extra": settings.announcement.to_extra()})
    return GlobalModel(fleet, 0, 1, None, training, spec.fingerprint, encode_weights(weights, parse_chain("none"))), spec


class Observer:
    """Everything on the fleet's update and presence topics."""

    def __init__(self) -> None:
        self.updates: list[str] = []
        self.presence: dict[str, Presence] = {}
        self.changed = asyncio.Event()


@contextlib.asynccontextmanager
async def observing(address: BrokerAddress, fleet: str) -> AsyncIterator[Observer]:
    topics, seen = Topics(fleet), Observer()
    async with Connection(address, f"observer-{fleet}"[:64], subscriptions=[topics.all_updates, f"{topics.all_updates}/#", topics.all_presence],
                          persistent=False) as conn:
        await conn.wait_connected()

        async def watch() -> None:
            while True:
                message = await conn.messages.get()
                topic, payload = str(message.topic), message.payload
                if not isinstance(payload, bytes) or not payload:
                    continue
                if "/updates/" in topic:
                    seen.updates.append(topic)
                else:
                    presence = Presence.from_bytes(payload)
                    seen.presence[presence.client_id] = presence
                seen.changed.set()

        task = asyncio.create_task(watch())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _until(seen: Observer, predicate) -> None:
    while not predicate():
        seen.changed.clear()
        await seen.changed.wait()


async def test_agents_train_a_secure_round_and_a_restarted_agent_sits_out_then_counts_in_the_retry(broker_address, fleet, tmp_path):
    settings = SecAggSettings(timeouts=TIMEOUTS)
    model, spec = _digits_round(fleet, settings)
    topics = Topics(fleet)
    configs = [agent_config(broker_address, fleet, tmp_path / "agents", i, task_options=DIGITS_4, exit_when_final=False) for i in range(4)]
    agents = [Agent(c) for c in configs]
    clients = [c.client_id for c in configs]
    store = Store()
    async with asyncio.timeout(90), observing(broker_address, fleet) as seen, \
            coordinator(broker_address, fleet, store, settings=settings, spec=spec) as coord:
        tasks = {a.config.client_id: asyncio.create_task(a.run()) for a in agents}
        await coord.conn.publish(topics.global_model, model.to_bytes(), retain=True)
        first = await coord.relay.start(1, clients, now=time.monotonic())
        # agents 2 and 3 restart once their keys are in (the advert taken, or the phase moved on)
        await coord.run(until=lambda: coord.relay.phase is not Phase.ADVERTISE
                        or not {"agent-2", "agent-3"} & set(coord.relay.waiting_for()))
        for client in ("agent-2", "agent-3"):
            agents[int(client[-1])].stop()
            await tasks[client]
        restarted = {c: Agent(configs[int(c[-1])]) for c in ("agent-2", "agent-3")}
        tasks.update({c: asyncio.create_task(a.run()) for c, a in restarted.items()})
        await _until(seen, lambda: all("restart" in seen.presence.get(c, Presence(fleet, c, "")).device.get("secagg", "")
                                       for c in restarted))
        await coord.run()
        abandoned = coord.relay.outcome
        assert isinstance(abandoned, Abandoned), abandoned  # 2 inputs at most: below min_survivors 3
        assert abandoned.detail and abandoned.reason.value == "below_threshold"

        retry = await coord.relay.start(1, clients, now=time.monotonic())  # the round again: a new session
        await coord.run()
        outcome = coord.relay.outcome
        everyone = {**{a.config.client_id: a for a in agents[:2]}, **restarted}
        for agent in everyone.values():
            agent.stop()
        await asyncio.gather(*tasks.values())
        assert seen.updates == []  # no agent ever published a plain Update in a secure round

    assert isinstance(outcome, SecureMean) and outcome.survivors == tuple(clients) and retry.session != first.session
    ring = Ring(32)
    total = ring.zeros(spec.num_parameters + 1)
    for agent in everyone.values():
        total = ring.add(total, agent._secure.submitted[retry.session])
    assert np.array_equal(outcome.aggregate.total, total)  # every agent counted once
    for client in ("agent-2", "agent-3"):  # trained once, before or after the restart (the delta was kept on disk)
        assert agents[int(client[-1])].stats.trained_versions + restarted[client].stats.trained_versions == [0]
        assert "restart" in restarted[client]._secure.stats.sat_out[0]
    inputs = {c: a._secure._input for c, a in everyone.items()}
    assert all(i is not None and i.round == 1 for i in inputs.values())
    weights = {c: i.num_samples for c, i in inputs.items() if i is not None}
    for tensor in spec.tensors:
        expected = sum(i.delta[tensor.name].astype(np.float64) * weights[c] for c, i in inputs.items() if i is not None) / sum(weights.values())
        np.testing.assert_allclose(outcome.delta[tensor.name], expected, atol=1e-5)

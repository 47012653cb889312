"""Mosquitto SIGKILLed and restarted (same port, same persistence folder) mid-round: the run completes
and the ledger holds."""

from __future__ import annotations

import asyncio

import pytest

from aggregator import Aggregator
from edge_agent import Agent
from fedge_contract import ReceiptStatus
from tests.integration.faults import Observer, assert_ledger, outbox_ids
from tests.integration.fleet import ManualGate, agent_config, aggregator_config

pytestmark = pytest.mark.integration


async def test_a_broker_restart_mid_round_loses_nothing(broker, broker_address, fleet, tmp_path):
    store = tmp_path / "agg.sqlite"
    late = ManualGate(passes=1)  # agent-2 trains round 1, then holds round 2 open across the restart
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i, backoff_cap=1.0), gate=late if i == 2 else None) for i in range(3)]
    aggregator = Aggregator(aggregator_config(broker_address, fleet, store, rounds=3, target=3, min_updates=3, evaluate=False))
    async with asyncio.timeout(90), asyncio.TaskGroup() as group:
        serving = group.create_task(aggregator.run())
        for agent in agents:
            group.create_task(agent.run())
        async with Observer(broker_address, fleet) as observer:
            await observer.until(lambda o: sum(r.round == 2 for r in o.with_status(ReceiptStatus.ACCEPTED)) == 2)
        await broker.kill()
        await broker.start()
        late.open()
        await serving

    received = [r for agent in agents for r in agent.stats.receipts]
    duplicates = {r.update_id for r in received if r.status is ReceiptStatus.DUPLICATE}
    ledger = assert_ledger(store, received, rounds=3, unreceipted_ok=duplicates)
    assert [len(ledger[n]) for n in (1, 2, 3)] == [3, 3, 3]
    assert all(agent.stats.trained_versions == [0, 1, 2] for agent in agents)
    assert all(not outbox_ids(tmp_path / f"agent-{i}") for i in range(3))

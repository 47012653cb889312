"""The whole nasty corpus flooded at a real aggregator with an allowlist: every payload gets a
rejection receipt with a typed reason, the aggregator keeps serving, and the model it produces is
the one a clean run produces."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import Receipt, ReceiptStatus, Topics
from fedge_contract.tensors import ModelSpec
from tests.contract.test_fuzz_corpus import REASONS, corpus
from tests.integration.fleet import agent_config, aggregator_config, raw_peer, run_fleet

pytestmark = pytest.mark.integration
ALLOWED = frozenset({"agent-0", "agent-1", "agent-2", "mallory"})


async def test_flood_of_hostile_payloads_changes_nothing(broker_address, fleet, tmp_path):
    # every device trains (no cohort): mallory's payloads must reach validation, not be refused as not invited
    settings = dict(rounds=2, target=3, min_updates=3, allowed_clients=ALLOWED, over_select=0)
    clean = Aggregator(aggregator_config(broker_address, f"{fleet}-c", tmp_path / "clean.sqlite", **settings))
    async with asyncio.timeout(60):
        await run_fleet(clean, [Agent(agent_config(broker_address, f"{fleet}-c", tmp_path / "clean", i)) for i in range(3)])

    topics = Topics(fleet)
    attacked = Aggregator(aggregator_config(broker_address, fleet, tmp_path / "attacked.sqlite", **settings))
    async with asyncio.timeout(120), raw_peer(broker_address, "mallory", topics.global_model, f"fl/{fleet}/receipts/+") as mallory:
        serving = asyncio.create_task(attacked.run())
        v0 = await mallory.first_model(topics)
        spec = ModelSpec.of({t.name: np.zeros(t.shape, np.float32) for t in v0.tensors})
        cases = corpus(spec, fleet=fleet, max_bytes=attacked.limits.max_bytes)
        for client, payload in cases.values():
            await mallory.client.publish(topics.update(client), payload, qos=1)
        receipts = []  # many carry no readable update id: count them rather than key them
        async for message in mallory.client.messages:
            if "/receipts/" in str(message.topic):
                receipts.append(Receipt.from_bytes(message.payload))  # type: ignore[arg-type]
                if len(receipts) == len(cases):
                    break
        assert serving.done() is False  # still serving after the flood
        agents = [Agent(agent_config(broker_address, fleet, tmp_path / "attacked", i)) for i in range(3)]
        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(agent.run())
            await serving

    assert all(r.status is ReceiptStatus.REJECTED and r.reason.split(":", 1)[0] in REASONS for r in receipts)
    assert attacked.counters["rejected"] == len(cases)
    assert attacked.counters["rejected:unknown_client"] == 1
    with Store(tmp_path / "attacked.sqlite") as store, Store(tmp_path / "clean.sqlite") as reference:
        got, want = store.latest_checkpoint(), reference.latest_checkpoint()
        assert sum(1 for row in store.receipts() if row["status"] == "rejected") == len(cases)
    assert got.version == want.version == 2
    for name, values in want.weights.items():
        np.testing.assert_allclose(got.weights[name], values, rtol=1e-6, atol=1e-7)


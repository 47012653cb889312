"""The aggregator process SIGKILLed mid-round and restarted on its store: it resumes the same round
with the updates it had spooled, counts none twice, and produces the model an uninterrupted
aggregator makes from the same updates."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import ReceiptStatus, Topics
from tests.integration.faults import Observer, assert_ledger, owned, sigkill, spawn_aggregator
from tests.integration.fleet import ManualGate, agent_config, aggregator_config, raw_peer

pytestmark = pytest.mark.integration


async def test_a_killed_aggregator_resumes_its_round_and_makes_the_same_model(broker, broker_address, fleet, tmp_path):
    store = tmp_path / "agg.sqlite"
    late = ManualGate(passes=0)  # agent-2 waits: the round cannot close before the kill
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=late if i == 2 else None) for i in range(3)]
    flags = ("--rounds=1", "--target=3", "--min=3", "--deadline=60")
    async with asyncio.timeout(90), Observer(broker_address, fleet) as observer, asyncio.TaskGroup() as group:
        for agent in agents:
            group.create_task(agent.run())
        async with owned(await spawn_aggregator(broker.url, fleet, store, tmp_path / "logs" / "agg.log", *flags)) as procs:
            await observer.until(lambda o: len(o.with_status(ReceiptStatus.ACCEPTED)) == 2)
            await sigkill(procs[0])
            procs.append(await spawn_aggregator(broker.url, fleet, store, tmp_path / "logs" / "agg-restarted.log", *flags))
            late.open()
            assert await procs[1].wait() == 0

    assert "round 1: re-folded 2 spooled updates" in (tmp_path / "logs" / "agg-restarted.log").read_text()
    duplicates = {r.update_id for r in observer.with_status(ReceiptStatus.DUPLICATE)}  # spooled, then killed before the receipt
    ledger = assert_ledger(store, observer.receipts, rounds=1, unreceipted_ok=duplicates)
    assert len(ledger[1]) == 3 and {r.client_id for r in observer.receipts} == {"agent-0", "agent-1", "agent-2"}

    # Determinism: an aggregator that never died, fed the same three updates, makes the same v1.
    reference_store = tmp_path / "reference.sqlite"
    reference = Aggregator(aggregator_config(broker_address, fleet, reference_store, rounds=1, target=3, min_updates=3,
                                             evaluate=False, client_id="reference-aggregator"))
    topics = Topics(fleet)
    async with asyncio.timeout(60), Observer(broker_address, fleet) as watch, asyncio.TaskGroup() as group:
        serving = group.create_task(reference.run())
        await watch.until(lambda o: any(s.round == 1 and s.model_version == 0 and s.state.value == "open" for s in o.statuses))
        async with raw_peer(broker_address, "replayer") as peer:
            for update_id in sorted(ledger[1]):
                receipt = next(r for r in observer.receipts if r.update_id == update_id)
                await peer.client.publish(topics.update(receipt.client_id), observer.updates[update_id], qos=1)
        await serving
    with Store(store) as killed, Store(reference_store) as uninterrupted:
        restarted_model, reference_model = killed.latest_checkpoint(), uninterrupted.latest_checkpoint()
        assert set(uninterrupted.accepted_ids(1)) == ledger[1]
    assert restarted_model.version == reference_model.version == 1
    for name, values in reference_model.weights.items():
        np.testing.assert_allclose(restarted_model.weights[name], values, rtol=1e-6, atol=1e-7)

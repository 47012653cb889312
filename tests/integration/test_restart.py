"""An aggregator stopped between rounds resumes from its checkpoint and the run ends where an
uninterrupted run ends."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import Topics
from fedge_contract.aio import cancel_and_wait
from tests.integration.fleet import agent_config, aggregator_config, raw_peer, run_fleet

pytestmark = pytest.mark.integration


async def test_restarted_aggregator_resumes_from_its_checkpoint(broker_address, fleet, tmp_path, caplog):
    reference = Aggregator(aggregator_config(broker_address, f"{fleet}-ref", tmp_path / "ref.sqlite", rounds=4, target=3, min_updates=3))
    async with asyncio.timeout(60):
        await run_fleet(reference, [Agent(agent_config(broker_address, f"{fleet}-ref", tmp_path / "ref", i)) for i in range(3)])

    store = tmp_path / "agg.sqlite"
    # the agents keep running across the aggregator's restart, as devices would
    agents = [Agent(agent_config(broker_address, fleet, tmp_path / "fleet", i, exit_when_final=False)) for i in range(3)]
    async with asyncio.timeout(90), asyncio.TaskGroup() as group:
        running = [group.create_task(agent.run()) for agent in agents]
        await Aggregator(aggregator_config(broker_address, fleet, store, rounds=2, target=3, min_updates=3)).run()
        with Store(store) as db:
            assert db.latest_checkpoint().version == 2
        caplog.clear()
        caplog.set_level(logging.INFO, logger="fedge.aggregator")
        resumed = Aggregator(aggregator_config(broker_address, fleet, store, rounds=4, target=3, min_updates=3))
        await resumed.run()
        for agent in agents:
            agent.stop()
        await asyncio.gather(*running)

    assert "resumed from checkpoint v2" in caplog.text
    with Store(store) as db, Store(tmp_path / "ref.sqlite") as ref:
        rounds = db.rounds()
        restarted_model, reference_model = db.latest_checkpoint(), ref.latest_checkpoint()
    assert [(r["round"], r["base_version"], r["accepted"]) for r in rounds] == [(1, 0, 3), (2, 1, 3), (3, 2, 3), (4, 3, 3)]
    assert all(agent.stats.trained_versions == [0, 1, 2, 3] for agent in agents)
    assert restarted_model.version == reference_model.version == 4
    for name, values in reference_model.weights.items():
        np.testing.assert_allclose(restarted_model.weights[name], values, rtol=1e-6, atol=1e-7)


async def test_a_store_of_another_fleet_is_refused(broker_address, fleet, tmp_path):
    store = tmp_path / "agg.sqlite"
    first = Aggregator(aggregator_config(broker_address, fleet, store, rounds=1, target=1, min_updates=1))
    async with asyncio.timeout(60):
        await run_fleet(first, [Agent(agent_config(broker_address, fleet, tmp_path, 0))])
    from aggregator.errors import StoreMismatch

    with pytest.raises(StoreMismatch, match="fleet"):
        await Aggregator(aggregator_config(broker_address, f"{fleet}-other", store, rounds=2)).run()


async def test_a_resumed_round_stays_open_for_devices_coming_back(broker_address, fleet, tmp_path):
    """Issue 19: a restarted aggregator reopened its round with the deadline it computed before announcing it
    ("deadline in 3s") while the agents were still in their reconnect backoff. A resumed round now stays open
    ``resend_grace`` seconds after its announcement, whatever its own deadline."""
    topics = Topics(fleet)
    store = tmp_path / "agg.sqlite"
    settings = dict(rounds=1, target=3, min_updates=1, deadline=0.5, resend_grace=60.0, evaluate=False)
    async with asyncio.timeout(60), raw_peer(broker_address, "peer", topics.status) as peer:
        first = asyncio.create_task(Aggregator(aggregator_config(broker_address, fleet, store, **settings)).run())
        fresh = await peer.wait_open(topics, version=0)
        assert fresh.deadline is not None and fresh.deadline - time.time() < 5  # a new round keeps its own deadline
        await cancel_and_wait([first])  # the aggregator dies mid-round

        second = asyncio.create_task(Aggregator(aggregator_config(broker_address, fleet, store, **settings)).run())
        try:
            resumed = await peer.wait_open(topics, version=0)
            assert resumed.deadline is not None and resumed.deadline - time.time() > 50
        finally:
            await cancel_and_wait([second])


async def test_a_resumed_round_confirms_the_updates_it_refolds(broker_address, fleet, tmp_path):
    """Issue 19: an aggregator killed after spooling an update but before its receipt left made the device count
    the update as dropped although it was folded. A resumed round sends ``accepted`` again for what it re-folds."""
    from fedge_contract import ReceiptStatus
    from tests.integration.fleet import zero_update

    topics = Topics(fleet)
    store = tmp_path / "agg.sqlite"
    settings = dict(rounds=1, target=2, min_updates=2, evaluate=False, over_select=0)
    async with asyncio.timeout(60), raw_peer(broker_address, "peer", topics.global_model, topics.receipt("a")) as peer:
        first = asyncio.create_task(Aggregator(aggregator_config(broker_address, fleet, store, **settings)).run())
        model = await peer.announcement(topics)  # a GlobalDelta (delta broadcasts) or a GlobalModel
        update = zero_update(fleet, "a", "u1", model.round, model.model_version)
        await peer.client.publish(topics.update("a"), update.to_bytes(), qos=1)
        assert (await peer.receipts(1))["u1"].status is ReceiptStatus.ACCEPTED
        await cancel_and_wait([first])

        second = asyncio.create_task(Aggregator(aggregator_config(broker_address, fleet, store, **settings)).run())
        try:
            again = (await peer.receipts(1))["u1"]  # the re-folded update is confirmed without being sent again
            assert again.status is ReceiptStatus.ACCEPTED and again.round == 1
        finally:
            await cancel_and_wait([second])
    with Store(store) as db:
        assert db.accepted_ids(1) == ["u1"]
        assert [r["status"] for r in db.receipts() if r["update_id"] == "u1"] == ["accepted"]  # recorded once

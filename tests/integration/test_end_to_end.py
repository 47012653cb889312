"""Five real agents and a real aggregator over a real Mosquitto, three rounds."""

from __future__ import annotations

import asyncio

import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import Presence, ReceiptStatus, Topics
from fedge_contract.aio import cancel_and_wait
from tests.integration.fleet import agent_config, aggregator_config, raw_peer, run_fleet

pytestmark = pytest.mark.integration


async def test_five_agents_three_rounds_accuracy_rises(broker_address, fleet, tmp_path):
    aggregator = Aggregator(aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite"))
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(5)]
    async with asyncio.timeout(60):
        await run_fleet(aggregator, agents)

    with Store(tmp_path / "agg.sqlite") as store:
        rounds = store.rounds()
        accepted = [store.accepted_ids(r["round"]) for r in rounds]
        checkpoint = store.latest_checkpoint()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["accepted"] for r in rounds] == [5, 5, 5]
    accuracy = [r["metrics"]["accuracy"] for r in rounds]
    # every later model beats the first (the default 1% top-k codec may dip by a point between rounds)
    assert accuracy[0] < min(accuracy[1:]), accuracy
    assert accuracy[2] > 0.5  # 10 classes: chance is 0.1
    assert checkpoint is not None and checkpoint.version == 3

    # every agent trained each version once, got an 'accepted' receipt for each, and emptied its outbox
    for agent in agents:
        assert agent.stats.trained_versions == [0, 1, 2]
        assert [r.status for r in agent.stats.receipts] == [ReceiptStatus.ACCEPTED] * 3
        assert not list((agent.config.state_dir / "outbox").glob("*.update"))
    all_ids = {r.update_id for agent in agents for r in agent.stats.receipts}
    assert all_ids == {uid for ids in accepted for uid in ids}

    # the retained announcement is the final version, marked final
    topics = Topics(fleet)
    async with raw_peer(broker_address, "observer", topics.global_model) as peer:
        final = await peer.announcement(topics)
    assert final.final and final.model_version == 3


async def test_agent_with_another_architecture_refuses_the_model(broker_address, fleet, tmp_path):
    topics = Topics(fleet)
    aggregator = Aggregator(aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=1, min_updates=1))
    wrong = Agent(agent_config(broker_address, fleet, tmp_path, 0, task_options={"clients": "5", "hidden": "64"}))
    async with asyncio.timeout(60), raw_peer(broker_address, "observer", topics.presence("agent-0")) as peer:
        serving = asyncio.create_task(aggregator.run())
        refusing = asyncio.create_task(wrong.run())
        try:
            # the agent says why it does not train, once it has seen the model
            presence = Presence.from_bytes(await peer.next_payload(topics.presence("agent-0")))
            while not presence.why_not:
                presence = Presence.from_bytes(await peer.next_payload(topics.presence("agent-0")))
        finally:
            wrong.stop()
            await refusing
            await cancel_and_wait([serving])
    assert presence.eligible is False
    assert "architecture" in presence.why_not and "same task" in presence.why_not
    assert wrong.stats.last_error == presence.why_not
    assert wrong.stats.trained_versions == []
    with Store(tmp_path / "agg.sqlite") as store:
        assert store.accepted_ids(1) == []

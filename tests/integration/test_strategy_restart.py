"""A server optimiser's state survives an aggregator restart: 2 rounds + 2 resumed == 4 uninterrupted."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Checkpoint, Store
from edge_agent import Agent
from fedge_contract import Topics
from tests.integration.fleet import agent_config, aggregator_config, raw_peer

pytestmark = pytest.mark.integration


async def run(broker_address, fleet: str, root, rounds: int) -> Checkpoint:
    # no cohort: the agents start only once the model is announced, so a cohort's check-in would only wait for nobody
    config = aggregator_config(broker_address, fleet, root / "agg.sqlite", rounds=rounds, strategy={"name": "fedadam", "server_lr": 0.03},
                               evaluate=False, over_select=0)
    topics = Topics(fleet)
    async with raw_peer(broker_address, "observer", topics.global_model) as peer, asyncio.TaskGroup() as group:
        serving = group.create_task(Aggregator(config).run())
        # agents start once this run announced its model: the retained one may still be the
        # previous run's final model, on which they would exit
        while (await peer.announcement(topics)).final:
            pass
        for i in range(5):
            group.create_task(Agent(agent_config(broker_address, fleet, root, i)).run())
        await serving
    with Store(root / "agg.sqlite") as store:
        checkpoint = store.latest_checkpoint()
    assert checkpoint is not None
    return checkpoint


async def test_fedadam_state_survives_a_restart(broker_address, fleet, tmp_path):
    async with asyncio.timeout(120):
        halfway = await run(broker_address, fleet, tmp_path / "restarted", rounds=2)
        resumed = await run(broker_address, fleet, tmp_path / "restarted", rounds=4)
        steady = await run(broker_address, f"{fleet}-b", tmp_path / "steady", rounds=4)
    assert (halfway.version, resumed.version, steady.version) == (2, 4, 4)
    assert set(halfway.strategy_state) == {f"fedadam.{mv}.{name}" for mv in "mv" for name in halfway.weights}
    assert set(resumed.strategy_state) == set(steady.strategy_state)
    for name in steady.weights:
        np.testing.assert_allclose(resumed.weights[name], steady.weights[name], rtol=1e-5, atol=1e-6)
    for key in steady.strategy_state:
        np.testing.assert_allclose(resumed.strategy_state[key], steady.strategy_state[key], rtol=1e-5, atol=1e-9)

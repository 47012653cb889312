"""A real agent sends the Update form its aggregator's task asks for (fedge_contract.compact).

A real Mosquitto and a real agent; a raw peer plays the aggregator. Given a task of this contract
(``update_form`` compact, the default) the agent publishes the compact array; given a task of an
aggregator that predates it (no ``update_form``: read as ``map``) it publishes the map that such an
aggregator decodes. Either decodes to the same kind of Update here.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from edge_agent import Agent
from fedge_contract import GlobalModel, TaskConfig, Topics, Update, compact
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.tensors import ModelSpec
from fedge_tasks import load_task
from fedge_tasks.weights import get_weights
from tests.integration.fleet import DIGITS_5, agent_config, raw_peer

pytestmark = pytest.mark.integration


def announcement(fleet: str, task: TaskConfig) -> bytes:
    weights = get_weights(load_task("digits", DIGITS_5).build_model())
    tensors = encode_weights(weights, parse_chain("none"))
    return GlobalModel(fleet, 0, 1, None, task, ModelSpec.of(weights).fingerprint, tensors).to_bytes()


@pytest.mark.parametrize("form", ["compact", "map"])
async def test_the_agent_sends_the_form_the_task_asks_for(broker_address, fleet, tmp_path, form):
    task = TaskConfig(local_epochs=1, update_form=form)
    if form == "map":  # exactly what an aggregator before the field publishes: no update_form at all
        assert "update_form" not in task.to_wire()
    topics = Topics(fleet)
    agent = Agent(agent_config(broker_address, fleet, tmp_path, 0))
    async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.update("agent-0")) as peer:
        await peer.client.publish(topics.global_model, announcement(fleet, task), qos=1, retain=True)
        running = asyncio.create_task(agent.run())
        payload = await peer.next_payload(topics.update("agent-0"))
        agent.stop()
        await running
    obj = msgpack.unpackb(payload, raw=False)
    if form == "compact":
        assert isinstance(obj, list) and obj[compact.UPDATE_FIELDS.index("codec")] == TaskConfig().codec
    else:
        assert isinstance(obj, dict) and obj["type"] == "update"
    update = Update.from_bytes(payload, max_bytes=1 << 24, fleet=fleet)
    assert update.client_id == "agent-0" and update.round == 1 and set(update.metrics) == {"loss", "accuracy", "train_seconds"}

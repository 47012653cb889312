"""Issue 19: an update no receipt answered is never lost silently. A real agent and a real
Mosquitto; a raw peer plays the aggregator, so the test decides which receipts come and when.

- A device that drops an unanswered update because its round is over says so at WARNING and
  counts it; the count travels in its retained presence (``fedge status`` and the aggregator read it).
- On the final model the agent settles its whole outbox: receipts that still come (the aggregator
  sends its queued ones before it exits) answer their updates; after a short grace whatever is
  left is dropped and counted the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest

from edge_agent import Agent
from fedge.status import snapshot
from fedge_contract import GlobalModel, Presence, Receipt, ReceiptStatus, TaskConfig, Topics, Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.tensors import ModelSpec
from fedge_tasks import load_task
from fedge_tasks.weights import get_weights
from tests.integration.faults import outbox_ids
from tests.integration.fleet import DIGITS_5, RawPeer, agent_config, raw_peer

pytestmark = pytest.mark.integration


def digits_model(fleet: str, version: int, round_no: int, *, final: bool = False) -> bytes:
    weights = get_weights(load_task("digits", DIGITS_5).build_model())
    tensors = encode_weights(weights, parse_chain("none"))
    return GlobalModel(fleet, version, round_no, None, TaskConfig(codec="none"), ModelSpec.of(weights).fingerprint, tensors,
                       final=final).to_bytes()


async def next_update(peer: RawPeer, topics: Topics) -> Update:
    return Update.from_bytes(await peer.next_payload(topics.update("agent-0")), max_bytes=10**8)


async def presence_where(peer: RawPeer, topics: Topics, predicate) -> Presence:  # type: ignore[no-untyped-def]
    while True:
        presence = Presence.from_bytes(await peer.next_payload(topics.presence("agent-0")))
        if predicate(presence):
            return presence


class Said(logging.Handler):
    """Sets ``event`` once a record saying ``text`` is logged: the test waits on the agent's own word."""

    def __init__(self, text: str, event: asyncio.Event) -> None:
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def dropped_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fedge.agent" and "dropped update" in r.getMessage()]


async def test_an_update_whose_round_is_over_is_dropped_at_warning_and_counted(broker_address, fleet, tmp_path, caplog):
    topics = Topics(fleet)
    agent = Agent(agent_config(broker_address, fleet, tmp_path, 0))
    async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.presence("agent-0"), topics.update("agent-0")) as peer:
        await peer.client.publish(topics.global_model, digits_model(fleet, 0, 1), qos=1, retain=True)
        running = asyncio.create_task(agent.run())
        unanswered = await next_update(peer, topics)
        # round 1 closes without it (its receipt never came): round 2 opens on v1
        await peer.client.publish(topics.global_model, digits_model(fleet, 1, 2), qos=1, retain=True)
        presence = await presence_where(peer, topics, lambda p: p.dropped > 0)
        assert (presence.state, presence.dropped) == ("online", 1)
        assert unanswered.update_id not in outbox_ids(tmp_path / "agent-0")
        agent.stop()
        await running
    [line] = dropped_lines(caplog)
    assert line.levelno == logging.WARNING and unanswered.update_id in line.getMessage() and "round 1" in line.getMessage()
    assert json.loads((tmp_path / "agent-0" / "state.json").read_text())["dropped_updates"] == 1  # survives a restart


async def test_on_the_final_model_unanswered_updates_are_dropped_after_a_grace_and_counted(broker_address, fleet, tmp_path, caplog):
    """Before issue 19 the agent exited on the final model with its last round's update still in its outbox."""
    topics = Topics(fleet)
    agent = Agent(agent_config(broker_address, fleet, tmp_path, 0, final_receipt_grace=0.5))
    async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.presence("agent-0"), topics.update("agent-0")) as peer:
        await peer.client.publish(topics.global_model, digits_model(fleet, 0, 1), qos=1, retain=True)
        running = asyncio.create_task(agent.run())
        unanswered = await next_update(peer, topics)
        # the last round closed without it and the aggregator published the final model (round 1, v1)
        await peer.client.publish(topics.global_model, digits_model(fleet, 1, 1, final=True), qos=1, retain=True)
        await running  # exit_when_final: it exits once its outbox is settled
        presence = await presence_where(peer, topics, lambda p: p.state == "offline")
    assert not outbox_ids(tmp_path / "agent-0")
    assert presence.dropped == 1
    [line] = dropped_lines(caplog)
    assert line.levelno == logging.WARNING and unanswered.update_id in line.getMessage()


async def test_a_receipt_sent_after_the_final_model_settles_its_update(broker_address, fleet, tmp_path, caplog):
    """The aggregator sends its queued receipts before it exits: they may follow the final model."""
    topics = Topics(fleet)
    agent = Agent(agent_config(broker_address, fleet, tmp_path, 0, final_receipt_grace=600.0))  # the receipt, not the grace, ends it
    async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.presence("agent-0"), topics.update("agent-0")) as peer:
        await peer.client.publish(topics.global_model, digits_model(fleet, 0, 1), qos=1, retain=True)
        running = asyncio.create_task(agent.run())
        update = await next_update(peer, topics)
        await peer.client.publish(topics.global_model, digits_model(fleet, 1, 1, final=True), qos=1, retain=True)
        receipt = Receipt(fleet, "agent-0", update.update_id, ReceiptStatus.ACCEPTED, "", 1, 0)
        await peer.client.publish(topics.receipt("agent-0"), receipt.to_bytes(), qos=1)
        await running
        presence = await presence_where(peer, topics, lambda p: p.state == "offline")
    assert presence.dropped == 0
    assert not outbox_ids(tmp_path / "agent-0")
    assert dropped_lines(caplog) == []
    assert [r.update_id for r in agent.stats.receipts] == [update.update_id]


async def test_an_agent_restarted_after_the_final_model_settles_its_outbox_and_logs_no_error(broker_address, fleet, tmp_path, caplog):
    """The device was off when training finished: its persistent session holds the final model, its
    outbox an update nobody answered. Restarted, it settles and exits; issue 19's chaos run saw an
    aiomqtt "Unexpected message ID" KeyError traceback here (an ack of a subscribe the exit abandoned)."""
    topics = Topics(fleet)
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.presence("agent-0"), topics.update("agent-0")) as peer:
        await peer.client.publish(topics.global_model, digits_model(fleet, 0, 1), qos=1, retain=True)
        device = Agent(agent_config(broker_address, fleet, tmp_path, 0))
        running = asyncio.create_task(device.run())
        unanswered = await next_update(peer, topics)
        device.stop()  # switched off before any receipt
        await running
        await peer.client.publish(topics.global_model, digits_model(fleet, 1, 1, final=True), qos=1, retain=True)  # queued in its session
        restarted = Agent(agent_config(broker_address, fleet, tmp_path, 0, final_receipt_grace=0.5))
        await restarted.run()
        presence = await presence_where(peer, topics, lambda p: p.state == "offline" and p.dropped > 0)
    assert presence.dropped == 1 and not outbox_ids(tmp_path / "agent-0")
    assert [line.getMessage() for line in dropped_lines(caplog)] == [
        f"agent-0: dropped update {unanswered.update_id} of round 1 unanswered: training is over"]
    assert "Unexpected message ID" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_agent_cut_off_as_it_settles_leaves_its_count_in_its_retained_presence(broker_address, fleet, tmp_path, fault_proxy,
                                                                                      caplog):
    """Issue 19's chaos soak: an agent whose connection dropped between the final model and its exit
    published no offline presence, so the broker's retained one was its last will, made when the
    agent started (dropped 0): `fedge status` showed 0 for a device that had dropped updates."""
    topics = Topics(fleet)
    link = await fault_proxy.add_link("agent-0", (broker_address.host, broker_address.port))
    finished = asyncio.Event()
    caplog.set_level(logging.INFO, logger="fedge.agent")
    said = Said("training finished", finished)
    logging.getLogger("fedge.agent").addHandler(said)
    try:
        agent = Agent(agent_config(BrokerAddress.parse(link.url), fleet, tmp_path, 0, final_receipt_grace=0.5))
        async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.update("agent-0")) as peer:
            await peer.client.publish(topics.global_model, digits_model(fleet, 0, 1), qos=1, retain=True)
            running = asyncio.create_task(agent.run())
            await next_update(peer, topics)
            await peer.client.publish(topics.global_model, digits_model(fleet, 1, 1, final=True), qos=1, retain=True)
            await finished.wait()
            link.cut(2, reset_now=True)  # its network goes now (the broker publishes its will) and comes back in 2 s
            await running  # its update dropped unanswered meanwhile
    finally:
        logging.getLogger("fedge.agent").removeHandler(said)
    presence = (await snapshot(broker_address, fleet)).devices["agent-0"]  # what `fedge status` shows
    assert (presence.state, presence.dropped) == ("offline", 1)
    assert json.loads((tmp_path / "agent-0" / "state.json").read_text())["dropped_updates"] == 1


async def test_the_last_will_carries_the_count_as_of_the_connection(broker_address, fleet, tmp_path, fault_proxy):
    """A will is fixed at connect: one made when the agent started said 0 whenever a device that had
    dropped updates since lost its connection. Each connection now registers the count it starts with."""
    topics = Topics(fleet)
    link = await fault_proxy.add_link("agent-0", (broker_address.host, broker_address.port))
    agent = Agent(agent_config(BrokerAddress.parse(link.url), fleet, tmp_path, 0))
    async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.presence("agent-0"), topics.update("agent-0")) as peer:
        await peer.client.publish(topics.global_model, digits_model(fleet, 0, 1), qos=1, retain=True)
        running = asyncio.create_task(agent.run())
        await next_update(peer, topics)
        await peer.client.publish(topics.global_model, digits_model(fleet, 1, 2), qos=1, retain=True)  # round 1 over, unanswered
        await presence_where(peer, topics, lambda p: p.dropped == 1)
        link.cut(0.2, reset_now=True)  # this connection's will was made before the drop
        await presence_where(peer, topics, lambda p: p.state == "offline")
        await presence_where(peer, topics, lambda p: p.state == "online")  # back: a new connection, a new will
        link.cut(math.inf, reset_now=True)
        will = await presence_where(peer, topics, lambda p: p.state == "offline")
        assert will.dropped == 1
        link.heal()
        agent.stop()
        await running

"""Secure aggregation through the production broker config (TLS, accounts, the ACL) on a real Mosquitto:
a device can neither read another device's key list or bundle nor write under another's id, and a
whole session runs through the ACL with device accounts and the aggregator's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from aggregator.secagg_relay import SecAggSettings, SecureMean
from broker import LocalBroker
from broker.local import free_port
from broker.provision import AGGREGATOR_USER, init
from fedge_contract.mqtt import BrokerAddress, ConnectionLost, make_client
from fedge_contract.secagg import KeyAdvert, MaskedInput, Reveal
from fedge_contract.secagg.topics import SecAggTopics
from tests.integration.secagg_fleet import TIMEOUTS, ModuleDevice, Store, announcement, coordinator, deltas, running

pytestmark = pytest.mark.integration
FLEET = "secure"
DEVICES = [f"agent-{i}" for i in range(4)]


@pytest_asyncio.fixture(loop_scope="function")
async def accounts(tmp_path: Path) -> AsyncIterator[dict[str, BrokerAddress]]:
    port = free_port()
    folder, aggregator = init(tmp_path / "broker", fleet=FLEET, host="127.0.0.1", port=port, bind="127.0.0.1")
    credentials = [aggregator] + [folder.add_account(name) for name in DEVICES]
    async with LocalBroker(port=port, data_dir=folder.path / "data", config_file=folder.config_file, tls=True):
        yield {c.username: BrokerAddress("127.0.0.1", port, tls=True, username=c.username, password=c.password, ca_file=str(c.ca_file))
               for c in credentials}


async def test_a_device_reads_only_its_own_key_list_and_bundle_and_writes_only_as_itself(accounts):
    s = SecAggTopics(FLEET)
    async with asyncio.timeout(30), \
            make_client(accounts[AGGREGATOR_USER], "aggregator", persistent=False) as aggregator, \
            make_client(accounts["agent-1"], "snoop", persistent=False) as snoop:
        for topic, payload in ((s.keys("agent-0"), b"keys of agent-0"), (s.bundle("agent-0"), b"boxes for agent-0"),
                               (s.setup, b"setup"), (s.keys("agent-1"), b"keys of agent-1")):
            await aggregator.publish(topic, payload, qos=1, retain=True)
        # agent-1 tries agent-0's key list and bundle, every device's, and agent-0's uploads; then its own key list
        for topic in (s.keys("agent-0"), s.bundle("agent-0"), f"{s.prefix}/down/+/+", f"{s.prefix}/down/#", f"{s.prefix}/up/+/agent-0",
                      s.all_from_devices, s.bundle("agent-1"), s.keys("agent-1")):
            await snoop.subscribe(topic, qos=1)
        await aggregator.publish(s.bundle("agent-0"), b"live boxes for agent-0", qos=1)
        await aggregator.publish(s.bundle("agent-1"), b"boxes for agent-1", qos=1)
        received = []
        async for message in snoop.messages:  # retained burst in subscription order, then the live ones
            received.append((str(message.topic), message.payload))
            if message.payload == b"boxes for agent-1":
                break
        # Mosquitto checks every delivery against the read rules: a wildcard subscription brings only what
        # agent-1 may read anyway (the setup, its own key list and bundle), never agent-0's
        assert {t for t, _ in received} == {s.setup, s.keys("agent-1"), s.bundle("agent-1")}
        assert not [p for _, p in received if b"agent-0" in p]

        await aggregator.subscribe(f"{s.prefix}/#", qos=1)
        forged = [s.device(KeyAdvert, "agent-1"), s.device(MaskedInput, "agent-1"), f"{s.masked_chunks('agent-1', 'session')}/0",
                  s.device(Reveal, "agent-1"), s.keys("agent-1"), s.bundle("agent-0"), s.setup, s.unmask]
        for topic in forged:
            # a denied QoS 1 publish is answered "not authorised" and the connection ends (see test_production_broker)
            with contextlib.suppress(ConnectionLost):
                async with make_client(accounts["agent-0"], "mallory", persistent=False) as mallory:
                    await mallory.publish(topic, b"forged", qos=1, retain=True)
        async with make_client(accounts["agent-0"], "mallory", persistent=False) as mallory:
            await mallory.publish(s.device(KeyAdvert, "agent-0"), b"sentinel", qos=1)  # its own topic: allowed
        seen = []
        async for message in aggregator.messages:
            if not message.retain:
                seen.append((str(message.topic), message.payload))
                if message.payload == b"sentinel":
                    break
        assert seen == [(s.device(KeyAdvert, "agent-0"), b"sentinel")]


async def test_a_whole_session_runs_through_the_production_acl(accounts, tmp_path):
    devices = [ModuleDevice(accounts[c], FLEET, c, tmp_path / c, max_message_bytes=1024) for c in DEVICES]  # chunked inputs too
    inputs, settings, store = deltas(DEVICES, seed=9), SecAggSettings(timeouts=TIMEOUTS), Store()
    model = announcement(FLEET, 1, settings)
    async with asyncio.timeout(60), running(devices), coordinator(accounts[AGGREGATOR_USER], FLEET, store, settings=settings) as coord:
        for device in devices:
            await device.secure.on_announcement(model)
            await device.secure.submit(model, *inputs[device.client_id])
        await coord.relay.start(1, DEVICES, now=time.monotonic())
        await coord.run()
    outcome = coord.relay.outcome
    assert isinstance(outcome, SecureMean) and outcome.survivors == tuple(DEVICES) and coord.refusals == []

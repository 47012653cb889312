"""fedge's MQTT Connection through a link that resets connections at random: every QoS 1 publish
still gets through (regression test for two hangs the proxy found: a publish from ``on_connect``
retrying forever on a dead client, and a reset during the handshake that aiomqtt ignored)."""

from __future__ import annotations

import asyncio
import random

import pytest

from fedge.netem import LinkProfile
from fedge_contract.mqtt import Backoff, BrokerAddress, Connection
from tests.integration.fleet import raw_peer

pytestmark = pytest.mark.integration


async def test_publishes_survive_random_resets_and_on_connect_runs_on_every_connection(broker, fleet, fault_proxy):
    link = await fault_proxy.add_link("device", ("127.0.0.1", broker.port), LinkProfile(reset_prob=0.2))
    topic = f"fl/{fleet}/updates/device"
    hellos: list[int] = []

    async def on_connect() -> None:
        hellos.append(connection.connections)
        await connection.publish(f"fl/{fleet}/presence/device", b"online", retain=True)

    connection = Connection(BrokerAddress.parse(link.url), "device", subscriptions=[f"fl/{fleet}/receipts/device"], persistent=True,
                            on_connect=on_connect, backoff=Backoff(0.01, 0.1, random.Random(1)))
    sent = {b"message %d" % i for i in range(30)}
    async with asyncio.timeout(60), raw_peer(BrokerAddress.parse(broker.url), f"{fleet}-reader", topic) as reader, connection:
        for payload in sorted(sent):
            await connection.publish(topic, payload)
        received: set[bytes] = set()
        async for message in reader.client.messages:  # QoS 1: at least once, so count distinct payloads
            received.add(bytes(message.payload))  # type: ignore[arg-type]
            if received >= sent:
                break
    assert received == sent
    assert link.stats.resets >= 1 and connection.connections == len(hellos) >= 2

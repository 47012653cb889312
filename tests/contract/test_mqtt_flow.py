"""Connection flow control against a real Mosquitto: a consumer that falls behind a flood holds at
most ``max_buffered`` messages (the rest wait in the broker), blocking calls never deadlock behind a
paused reader, and background publishes are flushed or cleanly abandoned."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import pytest

from fedge_contract.mqtt import BrokerAddress, Connection, make_client

pytestmark = pytest.mark.integration

FLOOD = 150
SIZE = 64 * 1024
MAX_BUFFERED = 8
# The broker keeps one message ahead of our acks (Receive Maximum 1): what may arrive between
# "at the limit" and "paused". Measured: the peak is exactly MAX_BUFFERED.
SLACK = 2


def payload(index: int) -> bytes:
    return index.to_bytes(4, "big") + bytes([index % 251]) * (SIZE - 4)


async def flood(address: BrokerAddress, topic: str, count: int = FLOOD) -> None:
    """Publish ``count`` messages at QoS 1; returns once the broker has acknowledged (stored) them all."""
    async with make_client(address, f"flooder-{topic}"[:64], persistent=False) as client:
        for i in range(count):
            await client.publish(topic, payload(i), qos=1)


@contextlib.asynccontextmanager
async def consumer(address: BrokerAddress, name: str, topic: str, max_buffered: int | None) -> AsyncIterator[Connection]:
    async with Connection(address, name, subscriptions=[topic], persistent=True, max_buffered=max_buffered) as conn:
        async with asyncio.timeout(10):
            await conn.connected.wait()
        yield conn


async def drain_slowly(conn: Connection, count: int) -> int:
    """Take ``count`` messages, each followed by some work and a few loop turns (the socket reader
    runs then, unless paused); check order and content; return the largest inbox seen."""
    peak = 0
    for i in range(count):
        peak = max(peak, conn.messages.qsize())
        message = await conn.messages.get()
        assert message.payload == payload(i)  # nothing lost, duplicated or reordered
        hashlib.sha256(message.payload).digest()
        for _ in range(5):
            await asyncio.sleep(0)
    return peak


async def test_a_consumer_behind_a_flood_holds_at_most_max_buffered_messages(broker_address, fleet):
    topic = f"{fleet}/flood"
    async with asyncio.timeout(60), consumer(broker_address, f"{fleet}-gated", topic, MAX_BUFFERED) as conn:
        await flood(broker_address, topic)
        peak = await drain_slowly(conn, FLOOD)
        assert conn.reading_pauses >= 1
    assert peak <= MAX_BUFFERED + SLACK, f"inbox reached {peak} messages"


async def test_without_a_bound_the_same_consumer_holds_the_whole_flood(broker_address, fleet):
    """The control: the previous test's bound is the gate's doing, not the broker's or the timing's."""
    topic = f"{fleet}/flood"
    async with asyncio.timeout(60), consumer(broker_address, f"{fleet}-open", topic, None) as conn:
        await flood(broker_address, topic)
        await conn.wait_inbox(lambda: conn.messages.qsize() >= FLOOD)  # everything arrives: nothing holds it back
        peak = await drain_slowly(conn, FLOOD)
    assert peak == FLOOD


async def test_waiting_for_an_ack_while_reading_is_paused_does_not_deadlock(broker_address, fleet):
    topic = f"{fleet}/flood"
    async with asyncio.timeout(60), consumer(broker_address, f"{fleet}-gated", topic, MAX_BUFFERED) as conn, \
            consumer(broker_address, f"{fleet}-observer", f"{fleet}/answers/#", None) as observer:
        await flood(broker_address, topic)
        await conn.wait_inbox(lambda: conn.reading_pauses > 0)
        # The PUBACK of this publish arrives behind the flood on the paused socket.
        await conn.publish(f"{fleet}/answers/direct", b"direct")
        await conn.subscribe(f"{fleet}/more")  # a SUBACK likewise
        for i in range(20):
            conn.publish_soon(f"{fleet}/answers/{i}", str(i).encode())
        await conn.flush()
        assert not conn._background
        received = set()
        while len(received) < 21:
            received.add(str((await observer.messages.get()).topic))
        assert received == {f"{fleet}/answers/direct", *(f"{fleet}/answers/{i}" for i in range(20))}
        # While a caller waits for its acks, reading goes on: about one flood message per ack awaited gets in.
        assert await drain_slowly(conn, FLOOD) <= MAX_BUFFERED + SLACK + 22


async def test_leaving_abandons_unflushed_background_publishes_cleanly(broker_address, fleet):
    async with asyncio.timeout(20), consumer(broker_address, f"{fleet}-leaver", f"{fleet}/x", None) as conn:
        for i in range(50):
            conn.publish_soon(f"{fleet}/answers/{i}", b"x" * 1000)
        pending = set(conn._background)
        assert pending
    assert all(task.done() for task in pending)  # cancelled and awaited, none left running


def test_max_buffered_below_two_is_refused():
    with pytest.raises(ValueError, match="max_buffered"):
        Connection(BrokerAddress.parse("mqtt://127.0.0.1:1"), "x", subscriptions=[], persistent=False, max_buffered=1)

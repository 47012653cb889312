"""Chunked messages over a real Mosquitto: Connection's run-time subscriptions across reconnects
and persistent sessions, and ChunkReceiver's fetch, re-announcement and timeout paths."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fedge_contract import Reason
from fedge_contract.chunks import ChunkLimits, Manifest, split
from fedge_contract.mqtt import Backoff, BrokerAddress, Connection, ConnectionLost, make_client
from fedge_contract.topics import Topics
from fedge_contract.transfer import WAKE_TOPIC, ChunkReceiver, Received, Refused, send_chunked

pytestmark = pytest.mark.integration


@asynccontextmanager
async def connection(address: BrokerAddress, name: str, subscriptions: list[str], *,
                     persistent: bool) -> AsyncIterator[tuple[Connection, asyncio.Queue[int]]]:
    """A Connection and a queue that gets its connection count at every (re)connect, once subscribed."""
    connects: asyncio.Queue[int] = asyncio.Queue()

    async def on_connect() -> None:
        connects.put_nowait(conn.connections)

    conn = Connection(address, name, subscriptions=subscriptions, persistent=persistent, on_connect=on_connect,
                      backoff=Backoff(0.01, 0.1, random.Random(1)))
    async with conn:
        yield conn, connects


async def next_message(conn: Connection) -> tuple[str, bytes]:
    message = await conn.messages.get()
    return str(message.topic), message.payload  # type: ignore[return-value]


async def test_subscriptions_made_at_run_time_survive_a_broker_restart(broker, fleet):
    address = BrokerAddress.parse(broker.url)
    topic = f"fl/{fleet}/dynamic"
    async with asyncio.timeout(30), connection(address, f"{fleet}-c", [], persistent=False) as (conn, connects):
        assert await connects.get() == 1
        await conn.subscribe(f"{topic}/+")
        await broker.stop()  # a clean session: the broker forgets our subscriptions
        await conn.subscribe(f"{topic}-offline")  # made while offline: the next connection makes it
        await broker.start()
        assert await connects.get() == 2
        async with make_client(address, f"{fleet}-pub2", persistent=False) as pub:
            await pub.publish(f"{topic}/2", b"after", qos=1)
            await pub.publish(f"{topic}-offline", b"offline", qos=1)
        assert [await next_message(conn) for _ in range(2)] == [(f"{topic}/2", b"after"), (f"{topic}-offline", b"offline")]


async def test_an_unsubscribe_made_offline_reaches_the_persistent_session_at_reconnect(broker, fleet):
    address = BrokerAddress.parse(broker.url)
    chunks, sentinel = f"fl/{fleet}/global/5/+", f"fl/{fleet}/sentinel"
    async with asyncio.timeout(30), connection(address, f"{fleet}-p", [sentinel], persistent=True) as (conn, connects):
        assert await connects.get() == 1
        await conn.subscribe(chunks)
        await broker.stop()
        await conn.unsubscribe(chunks)  # offline: the broker's saved session still holds the subscription
        await broker.start()
        assert await connects.get() == 2
        async with make_client(address, f"{fleet}-pub", persistent=False) as pub:
            await pub.publish(f"fl/{fleet}/global/5/0", b"stale", qos=1)
            await pub.publish(sentinel, b"sentinel", qos=1)
        assert await next_message(conn) == (sentinel, b"sentinel")  # one publisher: the chunk would have come first


async def test_a_receiver_drops_a_chunk_subscription_left_by_an_earlier_run(broker, fleet):
    address, topics = BrokerAddress.parse(broker.url), Topics(fleet)
    sentinel = f"fl/{fleet}/sentinel"
    async with asyncio.timeout(30):
        async with connection(address, f"{fleet}-agent", [sentinel], persistent=True) as (first, connects):
            await connects.get()
            await first.subscribe(f"{topics.global_chunks(5)}/+")  # then the program dies mid-fetch
        async with connection(address, f"{fleet}-agent", [sentinel], persistent=True) as (second, connects), \
                make_client(address, f"{fleet}-pub", persistent=False) as pub:
            await connects.get()
            receiver = ChunkReceiver(second, topics, ChunkLimits(max_size=10_000))
            await pub.publish(f"{topics.global_chunks(5)}/0", b"", qos=1, retain=True)  # e.g. the aggregator clearing v5
            topic, payload = await next_message(second)
            assert receiver.owns(topic) and await receiver.handle(topic, payload) == []
            await pub.publish(f"{topics.global_chunks(5)}/1", b"", qos=1, retain=True)
            await pub.publish(sentinel, b"sentinel", qos=1)
            assert await next_message(second) == (sentinel, b"sentinel")


async def test_a_reannounced_version_replaces_the_chunks_being_fetched(broker, fleet):
    """The aggregator re-announces v3 (new deadline: other bytes, same chunk topics) while an agent
    is fetching it: the agent skips the chunks that do not match, then completes the new set."""
    address, topics = BrokerAddress.parse(broker.url), Topics(fleet)
    old, new = bytes(range(256)) * 20, bytes(range(255, -1, -1)) * 20
    first = Manifest.of(old, fleet=fleet, kind="global", chunk_size=1024, model_version=3)
    second = Manifest.of(new, fleet=fleet, kind="global", chunk_size=1024, model_version=3)
    async with asyncio.timeout(30), connection(address, f"{fleet}-agent", [], persistent=False) as (agent, connects), \
            connection(address, f"{fleet}-aggregator", [], persistent=False) as (aggregator, ready):
        await connects.get()
        await ready.get()
        receiver = ChunkReceiver(agent, topics, ChunkLimits(max_size=10**6), bad_chunk="skip")
        base = topics.global_chunks(3)
        await aggregator.publish(f"{base}/0", split(old, 1024)[0], retain=True)  # the first announcement, cut short
        await receiver.offer(first)
        topic, payload = await next_message(agent)
        assert await receiver.handle(topic, payload) == [] and receiver.reassembler.received(base) == 1024

        await send_chunked(aggregator, topics, second, new, topic=topics.global_model, retain=True)
        for _ in range(second.count):  # the new chunks arrive live: none matches the first manifest
            assert await receiver.handle(*await next_message(agent)) == []
        assert receiver.reassembler.received(base) == 1024
        await receiver.offer(second)  # the new manifest: subscribing again brings the retained new chunks
        outcomes: list[Received | Refused] = []
        while not outcomes:
            outcomes = await receiver.handle(*await next_message(agent))
        assert outcomes == [Received(second, new)]
        assert receiver.keys() == []


async def test_a_stalled_fetch_wakes_the_owner_and_is_refused_incomplete(broker, fleet):
    address, topics = BrokerAddress.parse(broker.url), Topics(fleet)
    payload = b"x" * 3000
    manifest = Manifest.of(payload, fleet=fleet, kind="update", chunk_size=1024, client_id="dev", update_id="u1")
    async with asyncio.timeout(30), connection(address, f"{fleet}-agg", [], persistent=False) as (conn, connects):
        await connects.get()
        await conn.publish(f"{topics.update_chunks('dev', 'u1')}/0", payload[:1024], retain=True)
        receiver = ChunkReceiver(conn, topics, ChunkLimits(max_size=10**6, timeout=0.2), clear=True)
        await receiver.offer(manifest)
        outcomes: list[Received | Refused] = []
        topics_seen = []
        while not outcomes:
            topic, chunk = await next_message(conn)
            topics_seen.append(topic)
            outcomes = await receiver.handle(topic, chunk)
        assert topics_seen[-1] == WAKE_TOPIC  # the receiver's timer, through the owner's own queue
        [refused] = outcomes
        assert isinstance(refused, Refused) and refused.error.reason is Reason.INCOMPLETE and refused.received == 1024
        assert "chunks (1, 2) still missing" in refused.error.detail
        receiver.close()
    # clear=True: the chunk that did come is no longer retained
    async with make_client(address, f"{fleet}-check", persistent=False) as check:
        await check.subscribe(f"{topics.update_chunks('dev', 'u1')}/+", qos=1)  # retained chunks would come right after the SUBACK
        await check.subscribe(f"fl/{fleet}/sentinel", qos=1)
        await check.publish(f"fl/{fleet}/sentinel", b"end", qos=1)
        async for message in check.messages:
            assert str(message.topic) == f"fl/{fleet}/sentinel", "a cleared chunk is still retained"
            break


async def test_the_wake_topic_never_comes_from_the_broker(broker, fleet):
    """MQTT: a filter starting with a wildcard or a name never matches a topic starting with '$', so
    a peer cannot forge the receiver's timer (Mosquitto even refuses the publish)."""
    address = BrokerAddress.parse(broker.url)
    sentinel = f"fl/{fleet}/sentinel"
    async with asyncio.timeout(30), make_client(address, f"{fleet}-all", persistent=False) as everything:
        await everything.subscribe("#", qos=1)
        async with make_client(address, f"{fleet}-forger", persistent=False) as forger:
            try:
                await forger.publish(WAKE_TOPIC, b"", qos=1)
            except ConnectionLost:
                pass
        async with make_client(address, f"{fleet}-pub", persistent=False) as pub:
            await pub.publish(sentinel, b"end", qos=1)
        async for message in everything.messages:
            assert str(message.topic) != WAKE_TOPIC
            if str(message.topic) == sentinel:
                break


async def test_catch_up_sets_of_one_version_have_chunk_topics_of_their_own(broker, fleet):
    """Version 6 announced on ``global`` while the same version is the keyframe (``global/key``) and
    a retained delta (``global/delta/6``), all chunked with other bytes: a late device fetches each."""
    address, topics = BrokerAddress.parse(broker.url), Topics(fleet)
    payloads = {"global": bytes(range(256)) * 9, "keyframe": bytes(range(255, -1, -1)) * 11, "delta": b"\x07" * 3000}
    homes = {"global": topics.global_model, "keyframe": topics.global_keyframe, "delta": topics.global_delta(6)}
    manifests = {kind: Manifest.of(data, fleet=fleet, kind=kind, chunk_size=1024, model_version=6) for kind, data in payloads.items()}
    async with asyncio.timeout(30), connection(address, f"{fleet}-aggregator", [], persistent=False) as (aggregator, ready):
        await ready.get()
        for kind, manifest in manifests.items():
            await send_chunked(aggregator, topics, manifest, payloads[kind], topic=homes[kind], retain=True)
        async with connection(address, f"{fleet}-late", list(homes.values()), persistent=False) as (device, connects):
            await connects.get()
            receiver = ChunkReceiver(device, topics, ChunkLimits(max_size=10**6))
            received: dict[str, bytes] = {}
            while len(received) < 3:
                topic, payload = await next_message(device)
                if topic in homes.values():
                    await receiver.offer(Manifest.from_bytes(payload, max_size=10**6, fleet=fleet))
                    continue
                for outcome in await receiver.handle(topic, payload):
                    assert isinstance(outcome, Received), outcome
                    received[outcome.manifest.kind] = outcome.payload
            assert received == payloads

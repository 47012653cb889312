"""Issue 8's large-model benchmark: moving a model through Mosquitto whole or in chunks.

For each payload size, one fedge Connection publishes the payload and another receives it,
through a real local Mosquitto (the dev config, no size cap but MQTT's 256 MiB):

- ``whole``: one retained QoS 1 message (as fedge sends anything up to ``max_message_bytes``);
  impossible from 256 MiB on (MQTT's packet limit), reported as such;
- ``chunked``: the production path: the sender builds the manifest (sha256 per chunk and of the
  whole) and publishes retained chunks then the manifest; the receiver's ChunkReceiver subscribes
  to the chunks, verifies each one and the whole, and hands over the payload.

The time runs from the first publish to the verified payload at the receiver, hashing included
(both ends run in this one process, on one event loop, as an aggregator and an agent would each
run theirs). Each figure is the median of ``--repeat`` runs. The chunk sizes swept on the first
payload show where Mosquitto is fastest (DESIGN.md: throughput falls for messages of tens of MiB),
which is what the default ``max_message_bytes`` (8 MiB) rests on.

Prints JSON. Run: python -m bench.chunks [--sizes-mib 64,256] [--chunks-mib 1,4,8,16,32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import time
from typing import Any

from broker import LocalBroker
from fedge_contract.chunks import ChunkLimits, Manifest, is_manifest
from fedge_contract.mqtt import Backoff, BrokerAddress, Connection
from fedge_contract.topics import Topics
from fedge_contract.transfer import ChunkReceiver, Received, clear_chunks, send_chunked

MIB = 1024 * 1024
MQTT_MAX = 268_435_455  # the largest MQTT packet (remaining length), topic and headers included
FLEET = "bench"


async def _connection(address: BrokerAddress, name: str, subscriptions: list[str]) -> Connection:
    conn = Connection(address, name, subscriptions=subscriptions, persistent=False, backoff=Backoff(0.05, 0.5, random.Random(0)),
                      publish_timeout=300.0)
    await conn.__aenter__()
    await conn.connected.wait()
    return conn


async def _whole(sender: Connection, receiver: Connection, topics: Topics, payload: bytes) -> float:
    started = time.perf_counter()
    await sender.publish(topics.global_model, payload, retain=True)
    while True:
        message = await receiver.messages.get()
        if message.payload == payload:
            return time.perf_counter() - started


async def _chunked(sender: Connection, receiver: Connection, topics: Topics, payload: bytes, chunk: int, version: int) -> float:
    fetch = ChunkReceiver(receiver, topics, ChunkLimits(max_size=len(payload), timeout=120.0), bad_chunk="skip")
    started = time.perf_counter()
    manifest = Manifest.of(payload, fleet=FLEET, kind="global", chunk_size=chunk, model_version=version)
    sending = asyncio.create_task(send_chunked(sender, topics, manifest, payload, topic=topics.global_model, retain=True))
    try:
        while True:
            message = await receiver.messages.get()
            data = message.payload if isinstance(message.payload, bytes) else b""
            if str(message.topic) == topics.global_model and is_manifest(data):
                await fetch.offer(Manifest.from_bytes(data, max_size=len(payload), fleet=FLEET))
            elif fetch.owns(str(message.topic)):
                for outcome in await fetch.handle(str(message.topic), data):
                    assert isinstance(outcome, Received) and outcome.payload == payload, outcome
                    return time.perf_counter() - started
    finally:
        await sending
        fetch.close()


async def measure(sizes: list[int], chunk_sizes: list[int], repeat: int) -> dict[str, Any]:
    topics = Topics(FLEET)
    runs: list[dict[str, Any]] = []
    async with LocalBroker() as broker:
        address = BrokerAddress.parse(broker.url)
        sender = await _connection(address, "bench-sender", [])
        receiver = await _connection(address, "bench-receiver", [topics.global_model])
        version = 0
        try:
            for size in sizes:
                payload = os.urandom(size)
                sweep = chunk_sizes if size == sizes[0] else [8 * MIB]
                cases: list[tuple[str, int | None]] = [("whole", None)] + [("chunked", c) for c in sweep]
                for mode, chunk in cases:
                    if mode == "whole" and size + 64 > MQTT_MAX:
                        runs.append({"payload_mib": size / MIB, "mode": "whole", "possible": False,
                                     "why": "over MQTT's 256 MiB packet limit"})
                        continue
                    times = []
                    for _ in range(repeat):
                        version += 1
                        if mode == "whole":
                            times.append(await _whole(sender, receiver, topics, payload))
                        else:
                            assert chunk is not None
                            times.append(await _chunked(sender, receiver, topics, payload, chunk, version))
                            await clear_chunks(sender, topics.global_chunks(version), -(-size // chunk))  # spare the broker's memory
                    seconds = statistics.median(times)
                    runs.append({"payload_mib": size / MIB, "mode": mode, "chunk_mib": chunk / MIB if chunk else None,
                                 "chunks": -(-size // chunk) if chunk else 1, "seconds": round(seconds, 3),
                                 "mb_per_s": round(size / seconds / 1e6, 1), "all_seconds": [round(t, 3) for t in times]})
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                del payload
        finally:
            await receiver.__aexit__(None, None, None)
            await sender.__aexit__(None, None, None)
    return {"runs": runs, "hash_mb_per_s": _hash_speed()}


def _hash_speed() -> dict[str, float]:
    data = os.urandom(64 * MIB)
    speeds = {}
    for name in ("sha256", "blake2b"):
        started = time.perf_counter()
        hashlib.new(name, data).digest()
        speeds[name] = round(len(data) / (time.perf_counter() - started) / 1e6, 1)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="64,256", help="payload sizes in MiB (the first one also sweeps --chunks-mib)")
    parser.add_argument("--chunks-mib", default="1,4,8,16,32", help="chunk sizes swept on the first payload")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(float(s) * MIB) for s in args.sizes_mib.split(",")]
    chunks = [int(float(c) * MIB) for c in args.chunks_mib.split(",")]
    print(json.dumps(asyncio.run(measure(sizes, chunks, args.repeat)), indent=2))


if __name__ == "__main__":
    main()

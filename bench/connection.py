"""What the supervised Connection costs per publish: QoS 1 publishes through a real local Mosquitto.

Two ways fedge publishes: ``publish`` (one at a time, each waiting for its PUBACK: an agent's
update, a model) and ``publish_soon`` + ``flush`` (an aggregator's receipts). Each figure is the
median over ``--repeat`` runs of ``--count`` 200-byte messages, in publishes per second; the ratio
of two runs of this script on two trees (the same machine, minutes apart) is what to compare.

Prints JSON. Run: python -m bench.connection [--count 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from broker import LocalBroker
from fedge_contract.mqtt import BrokerAddress, Connection

PAYLOAD = b"r" * 200


async def rate(address: BrokerAddress, count: int, *, background: bool) -> float:
    async with Connection(address, f"bench-conn-{background}", subscriptions=[], persistent=False) as conn:
        await conn.connected.wait()
        start = time.perf_counter()
        for i in range(count):
            if background:
                conn.publish_soon(f"bench/{i % 16}", PAYLOAD)
            else:
                await conn.publish(f"bench/{i % 16}", PAYLOAD)
        await conn.flush()
        return count / (time.perf_counter() - start)


async def main(count: int, repeat: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        async with LocalBroker(data_dir=Path(folder)) as broker:
            address = BrokerAddress.parse(broker.url)
            await rate(address, count // 10, background=False)  # warm up
            awaited = [await rate(address, count, background=False) for _ in range(repeat)]
            soon = [await rate(address, count, background=True) for _ in range(repeat)]
    return {
        "messages": count, "repeat": repeat, "payload_bytes": len(PAYLOAD),
        "publish_per_s": round(statistics.median(awaited)), "publish_soon_flush_per_s": round(statistics.median(soon)),
        "publish_per_s_runs": [round(r) for r in awaited], "publish_soon_flush_per_s_runs": [round(r) for r in soon],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.count, args.repeat)), indent=1))

"""How long devices stay away after a broker outage: a real Mosquitto SIGKILLed and restarted.

Issue 19's double fault had agents back 7.5-15.7 s after a broker that was down 2.5 s. Here
``--devices`` Connections, each on its own seeded schedule, stay connected past the schedule's
``stable_after``; then Mosquitto is SIGKILLed, restarted on the same port ``--outage`` seconds
later, and each device's return is timed from the moment the broker listens again. Half the
devices run fedge's schedule (``fedge_contract.reconnect``, the agents' defaults), half the
attempt-count backoff it replaced (``U(0, min(30, 0.5 * 2**n))``, reset at each connect), in
the same run and through the same outage.

Prints JSON: seconds from the broker's return to each device's reconnect (median, p95, max),
with the bound ``Backoff.return_bound`` promises. Run: python -m bench.reconnect [--devices 200] [--outage 2.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

from broker import LocalBroker
from fedge_contract.mqtt import Backoff, BrokerAddress, Connection
from fedge_contract.reconnect import CAP, FIRST_WINDOW


class AttemptCountBackoff(Backoff):
    """The schedule before issue 19: capped full jitter on the attempt count, reset by every connect."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(0.5, CAP, rng, stable_after=0.0)  # stable_after 0: every connect resets
        self.attempt = 0
        self.last_offline = float("inf")

    def delay(self, offline_for: float) -> float:
        if offline_for < self.last_offline:  # a new outage (the Connection reset its clock)
            self.attempt = 0
        self.last_offline = offline_for
        window = min(self.cap, self.base * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self.rng.uniform(0.0, window)


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
        "max_s": round(ordered[-1], 3),
    }


async def measure(devices: int, outage: float, seed: int) -> dict[str, object]:
    schedules: dict[str, list[Backoff]] = {
        "fedge": [Backoff(FIRST_WINDOW, CAP, random.Random(seed * 100_000 + i)) for i in range(devices // 2)],
        "attempt_count_before": [AttemptCountBackoff(random.Random(seed * 100_000 + i)) for i in range(devices // 2)],
    }
    connected_at: dict[str, list[list[float]]] = {name: [[] for _ in backoffs] for name, backoffs in schedules.items()}
    everyone = asyncio.Event()
    total = sum(len(b) for b in schedules.values())

    def on_connect(name: str, index: int) -> object:
        async def record() -> None:
            connected_at[name][index].append(time.monotonic())
            if sum(len(times) >= wanted for times in (t for per in connected_at.values() for t in per)) == total:
                everyone.set()

        return record

    with tempfile.TemporaryDirectory() as folder:
        async with LocalBroker(data_dir=Path(folder)) as broker:
            address = BrokerAddress.parse(broker.url)
            connections = [
                Connection(address, f"bench-{name}-{i}", subscriptions=[], persistent=False, backoff=backoff, on_connect=on_connect(name, i))
                for name, backoffs in schedules.items() for i, backoff in enumerate(backoffs)
            ]
            wanted = 1
            for conn in connections:
                await conn.__aenter__()
            try:
                await everyone.wait()
                await asyncio.sleep(Backoff().stable_after + 1)  # the connections lived: the kill starts a new outage
                everyone.clear()
                wanted = 2
                await broker.kill()
                killed = time.monotonic()
                await asyncio.sleep(outage)
                await broker.start()
                back = time.monotonic()
                await everyone.wait()
            finally:
                for conn in connections:
                    await conn.__aexit__(None, None, None)
    result: dict[str, object] = {"devices": total, "outage_s": round(back - killed, 3), "seed": seed}
    for name in schedules:
        result[name] = summary([times[1] - back for times in connected_at[name]])
    result["fedge_bound_refused_s"] = Backoff().return_bound(back - killed, connect_timeout=0.0)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--outage", type=float, default=2.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # 200 "lost or refused" warnings say nothing here
    print(json.dumps(asyncio.run(measure(args.devices, args.outage, args.seed)), indent=1))

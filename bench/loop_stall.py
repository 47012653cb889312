"""How long the aggregator's event loop is kept from running (issue 14: goal < 50 ms).

The event loop serves the aggregator's MQTT connection: keepalives, PUBACKs, receipts, the
dashboard. Before the store moved to its own thread, closing a round with a 100 MB model held the
loop for 1.43 s (the checkpoint's SQLite transaction). This bench runs a real aggregator, in this
process, against a real Mosquitto and devices in another process (this module with ``--devices``:
for every round the retained RoundStatus opens, each device publishes one update of the model's
shape, seeded noise in the round's codec), with ``fedge_runtime.loop_stall.LoopStallMonitor``
ticking every 5 ms on the aggregator's loop and its dashboard polled every 100 ms (its history
queries go through the store's thread). The global model goes out in the aggregator's default
8 MiB chunks. Two scenarios:

- ``round_1m``: a 1M-parameter model (4 MB), 20 devices, ``q8+zstd`` updates, 3 rounds;
- ``round_10m``: a 10M-parameter model (40 MB), 2 devices, small top-k updates, 3 rounds;
- ``checkpoint_100mb``: a 25M-parameter model (100 MB float32 checkpoint per version), 2 devices
  with small top-k updates, 2 rounds: what stalls here is whole-model work (strategy, checkpoint,
  encoding and publishing the global model).

The model goes out as the aggregator's default broadcasts (delta broadcasts: a hold and its
lossless keyframe at v0, then a delta per version, each committed with its checkpoint), or with
``--broadcast full`` as the whole float32 model every version. Printed beside the stalls: what each
version's announcement weighed, the keyframe, and the last version's broadcast encode time (the
aggregator's ``fedge_broadcast_encode_seconds``: delta, held model, hash and state, off the loop).

Printed per scenario: the longest stall while serving (from the moment the dashboard serves, i.e.
the store is open, to the exit), the start-up's apart (importing torch and building the model, before
anything is served), the count of stalls over 50 ms, seconds per round,
what the aggregator's own monitor (its Prometheus gauge) saw. Prints JSON.
Run: python -m bench.loop_stall [--only round_1m|round_10m|checkpoint_100mb] [--broadcast deltas|full]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import Aggregator, config_of
from aggregator.broadcasting.deltas import DeltaBroadcasts
from broker import LocalBroker
from fedge_contract import RoundState, RoundStatus, Topics, Update, new_update_id
from fedge_contract.aio import cancel_and_wait
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress, make_client
from fedge_runtime.loop_stall import LoopStallMonitor
from fedge_tasks.synthetic import layer_shapes

FLEET = "stall"


@dataclass(frozen=True)
class Scenario:
    params: int
    devices: int
    rounds: int
    codec: str


SCENARIOS = {
    "round_1m": Scenario(params=1_000_000, devices=20, rounds=3, codec="q8+zstd"),
    "round_10m": Scenario(params=10_000_000, devices=2, rounds=3, codec="flat+topk:0.01+q4+zstd"),
    "checkpoint_100mb": Scenario(params=25_000_000, devices=2, rounds=2, codec="flat+topk:0.001+q8+zstd"),
}


async def _poll_dashboard(aggregator: Aggregator, stall: LoopStallMonitor, startup: list[float]) -> None:
    """Load: the dashboard's state every 100 ms, as a browser tab does every second, once it serves.

    The first time it serves, the stall measured so far is the start-up's (importing torch, building
    the model): set aside in ``startup``, so that the rest is what serving the fleet saw."""
    while True:
        server = aggregator.dashboard_server
        if server is not None and not startup:
            startup.append(stall.reset())
        with contextlib.suppress(OSError):
            if server is None:
                raise OSError("not serving yet")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /api/state HTTP/1.0\r\n\r\n")
            await writer.drain()
            await reader.read()
            writer.close()
        await asyncio.sleep(0.1)


async def run_scenario(name: str, scenario: Scenario, folder: Path, broadcast: str = "deltas") -> dict[str, Any]:
    model_bytes = scenario.params * 4
    async with LocalBroker(data_dir=folder / "broker") as broker:
        config = config_of(
            broker.url, fleet=FLEET, task="synthetic", task_options={"params": str(scenario.params)}, rounds=scenario.rounds,
            target=scenario.devices, min_updates=scenario.devices, deadline=600.0, store=folder / "agg.sqlite",
            training={"codec": scenario.codec}, dashboard_port=0, evaluate=False, broadcast={"deltas": broadcast == "deltas"},
            over_select=0,  # the devices here are raw publishers without presence: no cohort (everyone is invited)
        )
        aggregator = Aggregator(config)
        host = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loop_stall", "--devices", name, "--broker", broker.url, stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            async with LoopStallMonitor() as stall:
                serving = asyncio.create_task(aggregator.run())
                startup: list[float] = []
                poller = asyncio.create_task(_poll_dashboard(aggregator, stall, startup))
                started = time.perf_counter()
                try:
                    await serving
                finally:
                    await cancel_and_wait([poller])
                seconds = time.perf_counter() - started
        finally:
            if host.returncode is None:
                host.kill()
            await host.wait()
    return {
        "params": scenario.params,
        "model_mb": round(model_bytes / 1e6, 1),
        "devices": scenario.devices,
        "rounds": scenario.rounds,
        "codec": scenario.codec,
        "longest_stall_ms": round(stall.longest * 1000, 1),  # while serving (the dashboard up to the exit)
        "startup_stall_ms": round(startup[0] * 1000, 1) if startup else None,  # importing torch, building the model
        "stalls_over_50ms": stall.stalls,
        "aggregator_monitor_longest_ms": round(aggregator.stall.longest * 1000, 1),
        "seconds_per_round": round(seconds / scenario.rounds, 2),
        "goal_ms": 50,
        "met": stall.longest < 0.05,
        "broadcast": broadcast_figures(aggregator),
    }


def broadcast_figures(aggregator: Aggregator) -> dict[str, Any]:
    """What the announcements weighed (each device downloads one per version) and the broadcast's encode time."""
    announced = aggregator.metrics.registry.get_sample_value("fedge_broadcast_bytes_total", {"kind": "announcement"})
    channel = aggregator.channel
    if not isinstance(channel, DeltaBroadcasts):
        return {"kind": "full", "announcement_bytes_total": announced}
    sent = channel.broadcaster.sent
    return {
        "kind": "deltas", "announcement_bytes_per_version": {s.version: s.announcement for s in sent},
        "keyframe_bytes": max(s.keyframe for s in sent),
        "encode_seconds_last_version": round(aggregator.metrics.registry.get_sample_value("fedge_broadcast_encode_seconds") or 0.0, 3),
        "catch_up_worst_bytes": aggregator.metrics.registry.get_sample_value("fedge_broadcast_catch_up_worst_bytes"),
    }


async def devices(name: str, broker_url: str) -> None:
    """The devices of scenario ``name``: one update each per round that opens, until the fleet is finished."""
    scenario = SCENARIOS[name]
    rng = np.random.default_rng(0)
    delta = {n: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)) for n, shape in layer_shapes(scenario.params, 4)}
    tensors = encode_weights(delta, parse_chain(scenario.codec), rng=rng)
    topics = Topics(FLEET)
    answered: set[int] = set()
    async with make_client(BrokerAddress.parse(broker_url), f"stall-devices-{name}", persistent=False) as client:
        await client.subscribe(topics.status, qos=1)
        async for message in client.messages:
            status = RoundStatus.from_bytes(message.payload)  # type: ignore[arg-type]
            if status.state is RoundState.FINISHED:
                return
            if status.state is RoundState.OPEN and status.round not in answered:
                answered.add(status.round)
                for i in range(scenario.devices):
                    update = Update(FLEET, f"dev-{i}", new_update_id(), status.round, status.model_version, 10, tensors)
                    await client.publish(topics.update(f"dev-{i}"), update.to_bytes(), qos=1)


async def main(only: str | None, broadcast: str) -> None:
    out: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        if only and name != only:
            continue
        with tempfile.TemporaryDirectory(prefix="fedge-stall-") as folder:
            out[name] = await run_scenario(name, scenario, Path(folder), broadcast)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS))
    parser.add_argument("--devices", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)  # the child that plays the devices
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--broadcast", choices=["deltas", "full"], default="deltas",
                        help="delta broadcasts (the default) or the whole model every version (--no-delta-broadcasts)")
    args = parser.parse_args()
    asyncio.run(devices(args.devices, args.broker) if args.devices else main(args.only, args.broadcast))

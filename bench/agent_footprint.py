"""What a real agent costs on its device: memory idle and training, idle CPU, latency, installed size.

Runs the real CLI agent (``fedge agent``, training isolated in a child process, policy ``always``)
against a real Mosquitto, with the aggregator in this process, and prints JSON:

- ``idle_rss_mib``: the agent's resident memory while connected and waiting for a round;
- ``idle_cpu_percent_of_one_core``: its CPU time over ``idle_seconds`` (60 by default;
  FEDGE_BENCH_IDLE_SECONDS shortens it for a quick run) divided by wall time;
- ``training_peak_rss_mib``: the agent plus its training child, sampled every 20 ms while training
  the digits task (``child_peak_rss_mib`` is the child's own VmHWM-equivalent, ru_maxrss);
- ``after_training_rss_mib``: the agent once the child has exited;
- ``announce_to_update_s``: from the global model arriving at an observer to the agent's update
  arriving at the same observer (child start + torch import + task load + training + upload);
- ``in_process_idle_rss_mib``: the same agent with ``--in-process-training`` (torch loaded), for scale;
- ``installed_mib``: sizes from the installed distributions' RECORD files (see ``installed_size``).

Run: ``python -m bench.agent_footprint``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import psutil

from aggregator import Aggregator, config_of
from broker import LocalBroker
from fedge_contract import Presence, Topics
from fedge_contract.aio import cancel_and_wait
from fedge_contract.mqtt import BrokerAddress, make_client

FLEET = "footprint"
CLIENT = "agent-0"


def rss_mib(proc: psutil.Process, *, with_children: bool = False) -> float:
    procs = [proc] + (proc.children(recursive=True) if with_children else [])
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


async def start_agent(url: str, state: Path, *extra: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedge", "agent", "--broker", url, "--fleet", FLEET, "--client-id", CLIENT,
        "--state-dir", str(state), "--task-opt", "clients=5", "--policy", "always", "--log-level", "warning", *extra,
        env=env,
    )


async def wait_online(client) -> None:
    async for message in client.messages:
        if "/presence/" in str(message.topic) and Presence.from_bytes(message.payload).state == "online":
            return


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()


async def measure(idle_seconds: float) -> dict[str, float]:
    topics = Topics(FLEET)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        async with LocalBroker(data_dir=tmp_path / "broker") as broker:
            address = BrokerAddress.parse(broker.url)
            async with make_client(address, "observer", persistent=False) as observer:
                for topic in (topics.presence(CLIENT), topics.global_model, topics.update(CLIENT)):
                    await observer.subscribe(topic, qos=1)

                # in-process training, for scale: torch stays loaded in the agent
                agent = await start_agent(broker.url, tmp_path / "inproc", "--in-process-training", "--client-id", "agent-1")
                async with make_client(address, "observer-1", persistent=False) as o1:
                    await o1.subscribe(topics.presence("agent-1"), qos=1)
                    await wait_online(o1)
                out["in_process_idle_rss_mib"] = round(rss_mib(psutil.Process(agent.pid)), 1)
                await stop(agent)

                agent = await start_agent(broker.url, tmp_path / "state")
                me = psutil.Process(agent.pid)
                try:
                    await wait_online(observer)  # connected; its describe child has exited
                    out["idle_rss_mib"] = round(rss_mib(me, with_children=True), 1)
                    before, t0 = me.cpu_times(), time.monotonic()
                    await asyncio.sleep(idle_seconds)
                    after, t1 = me.cpu_times(), time.monotonic()
                    used = (after.user + after.system) - (before.user + before.system)
                    out["idle_seconds"] = round(t1 - t0, 1)
                    out["idle_cpu_seconds"] = round(used, 3)
                    out["idle_cpu_percent_of_one_core"] = round(100 * used / (t1 - t0), 3)
                    out["idle_rss_after_window_mib"] = round(rss_mib(me, with_children=True), 1)

                    config = config_of(
                        address, fleet=FLEET, task="digits", task_options={"clients": "5"}, rounds=1, target=1,
                        min_updates=1, deadline=120.0, store=tmp_path / "agg.sqlite", evaluate=False,
                    )
                    serving = asyncio.create_task(Aggregator(config).run())
                    peak = [0.0]

                    async def sample() -> None:
                        while True:
                            peak[0] = max(peak[0], rss_mib(me, with_children=True))
                            await asyncio.sleep(0.02)

                    sampler = asyncio.create_task(sample())
                    announced = None
                    async for message in observer.messages:
                        topic = str(message.topic)
                        if topic == topics.global_model and announced is None and message.payload:
                            announced = time.perf_counter()
                        elif topic == topics.update(CLIENT) and announced is not None:
                            out["announce_to_update_s"] = round(time.perf_counter() - announced, 3)
                            break
                    await serving
                    await cancel_and_wait([sampler])
                    out["training_peak_rss_mib"] = round(peak[0], 1)
                    out["after_training_rss_mib"] = round(rss_mib(me, with_children=True), 1)
                finally:
                    await stop(agent)
    return out


def _requirements(name: str) -> list[str]:
    names = []
    for req in metadata.requires(name) or []:
        if "extra ==" in req:
            continue
        names.append(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0])
    return names


def closure(root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
        todo.extend(_requirements(name))
    return seen


def dist_mib(names: set[str]) -> float:
    total = 0
    for name in names:
        for file in metadata.distribution(name).files or []:
            try:
                total += file.locate().stat().st_size
            except OSError:
                pass
    return round(total / 2**20, 1)


def installed_size() -> dict[str, object]:
    """fedge's runtime dependency closure (no extras: the agent) from RECORD; torch's part; the [aggregator] and [sim] extras."""
    runtime = closure("fedge")
    torch_part = closure("torch")
    waiting = closure("aiomqtt") | closure("msgpack") | closure("numpy") | closure("psutil") | closure("zstandard")
    aggregator = (closure("rich") | closure("cryptography") | closure("prometheus-client")) - runtime
    sim = (aggregator | closure("matplotlib")) - runtime
    packages = ("fedge", "fedge_runtime", "fedge_contract", "fedge_tasks", "edge_agent", "aggregator", "broker")
    return {
        "runtime_closure_mib": dist_mib(runtime),
        "torch_and_its_deps_mib": dist_mib(torch_part),
        "waiting_agent_deps_mib": dist_mib(waiting),
        "aggregator_extra_mib": dist_mib(aggregator),
        "sim_extra_mib": dist_mib(sim),
        "counted": sorted(runtime),
        "note": "fedge is installed editable here, so its own files count ~0; its source is "
        f"{sum(p.stat().st_size for d in packages for p in Path(d).rglob('*.py')) / 2**20:.2f} MiB of .py",
    }


def main() -> None:
    idle_seconds = float(os.environ.get("FEDGE_BENCH_IDLE_SECONDS", "60"))
    result = asyncio.run(measure(idle_seconds))
    result["installed"] = installed_size()
    result["cores"] = psutil.cpu_count()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""A device probe that fails never takes the agent down (issue 14: psutil's "PID has been reused"
on arm64 Debian made the agent exit at start-up).

Real Mosquitto, real aggregator, a real agent whose CPU meter watches a process that is gone, so
every sample raises psutil.NoSuchProcess for real. Under the ``pi`` policy an unknown CPU load
does not block: the agent trains its round, and its retained presence says which reading is
unknown and why.
"""

from __future__ import annotations

import asyncio

import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from edge_agent.conditions import PolicyGate
from edge_agent.policy import PRESETS
from edge_agent.probes import CpuLoadMeter, DeviceProbe
from fedge_contract import Presence, Topics
from tests.agent.sysfs import gone_process
from tests.integration.fleet import agent_config, aggregator_config, raw_peer

pytestmark = pytest.mark.integration


async def test_a_failing_cpu_meter_is_reported_in_presence_and_the_agent_trains(broker_address, fleet, tmp_path):
    topic = Topics(fleet).presence("agent-0")
    aggregator = Aggregator(aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=1, min_updates=1))
    probe = DeviceProbe(sysfs=tmp_path / "sys", procfs=tmp_path / "proc", termux=False, psutil_battery=False,
                        cpu=CpuLoadMeter(process=gone_process()))
    presences: list[Presence] = []

    async with asyncio.timeout(90), raw_peer(broker_address, "observer", topic) as peer:
        async def observe(reported: asyncio.Event) -> None:
            while True:
                presences.append(Presence.from_bytes(await peer.next_payload(topic)))
                if presences[-1].state == "online" and "cpu_load: NoSuchProcess" in str(presences[-1].device.get("unknown")):
                    reported.set()

        reported = asyncio.Event()
        async with PolicyGate(PRESETS["pi"], probe, sample_seconds=3600) as gate:
            agent = Agent(agent_config(broker_address, fleet, tmp_path, 0), gate=gate)
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(observe(reported))
                running = group.create_task(agent.run())
                await reported.wait()
                assert not running.done()  # the failed reading did not end the agent
                await aggregator.run()
                await running  # it trained and left on the final model, as a healthy agent does
                watcher.cancel()

    first = next(p for p in presences if p.state == "online")
    assert first.eligible and first.why_not == ""  # unknown load: a pi trains anyway
    assert first.device["unknown"].startswith("cpu_load: NoSuchProcess")
    assert agent.stats.trained_versions == [0]
    with Store(tmp_path / "agg.sqlite") as store:
        assert len(store.accepted_ids(1)) == 1

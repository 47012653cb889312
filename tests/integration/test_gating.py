"""Unplugged mid-training: the agent stops between batches, publishes nothing partial, and trains
again once plugged back in. Real Mosquitto, real aggregator, a fake sysfs tree the test rewrites.

Both training modes: in a child process (the CLI agent's default) and in a worker thread (the
simulation's). The task holds its 3rd batch on a named pipe, so the test unplugs while training
is provably mid-way, without sleeps.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from edge_agent.conditions import PolicyGate
from edge_agent.policy import Policy
from edge_agent.probes import DeviceProbe
from fedge_contract import Presence, Topics
from fedge_tasks.digits import DigitsTask
from tests.integration.fleet import agent_config, aggregator_config, raw_peer

pytestmark = pytest.mark.integration

BLOCK_AT = 3


def write_power(root: Path, *, plugged: bool) -> None:
    bat = root / "class" / "power_supply" / "BAT0"
    ac = root / "class" / "power_supply" / "AC"
    for folder in (bat, ac):
        folder.mkdir(parents=True, exist_ok=True)
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("80\n")
    (bat / "status").write_text("Charging\n" if plugged else "Discharging\n")
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("1\n" if plugged else "0\n")


class ObservedGate(PolicyGate):
    """The real gate, plus an event when the agent starts waiting for eligibility the 2nd time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waits = 0
        self.waiting_again = asyncio.Event()

    async def wait_eligible(self) -> None:
        self.waits += 1
        if self.waits == 2:
            self.waiting_again.set()
        await super().wait_eligible()


@pytest.mark.parametrize("isolate", [True, False], ids=["child-process", "in-thread"])
async def test_unplugged_mid_training_stops_and_resumes(broker_address, fleet, tmp_path, isolate):
    sysfs = tmp_path / "sys"
    write_power(sysfs, plugged=True)
    fifo, marker, calls = tmp_path / "hold", tmp_path / "held-once", tmp_path / "calls.log"
    os.mkfifo(fifo)
    options = {"clients": "5", "alpha": "0.5", "fifo": str(fifo), "marker": str(marker), "calls": str(calls), "block_at": str(BLOCK_AT)}
    topics = Topics(fleet)
    aggregator = Aggregator(aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=1, min_updates=1))
    config = agent_config(
        broker_address, fleet, tmp_path, 0, task="tests.integration.gating_task:BlockingDigits", task_options=options,
        isolate_training=isolate,
    )
    policy = Policy(require_charging=True, max_cpu_load=None, max_temperature_c=70.0)
    probe = DeviceProbe(sysfs=sysfs, procfs=tmp_path / "proc", termux=False, psutil_battery=False)
    presences: list[Presence] = []
    updates: list[bytes] = []

    async with asyncio.timeout(90), raw_peer(broker_address, "observer", topics.presence("agent-0"), topics.update("agent-0")) as peer:
        async def observe(unplugged_seen: asyncio.Event, replugged_seen: asyncio.Event) -> None:
            async for message in peer.client.messages:
                if "/updates/" in str(message.topic):
                    updates.append(message.payload)
                    continue
                presence = Presence.from_bytes(message.payload)
                presences.append(presence)
                if presence.eligible is False and "not charging" in presence.why_not:
                    unplugged_seen.set()
                elif unplugged_seen.is_set() and presence.eligible:
                    replugged_seen.set()

        unplugged_seen, replugged_seen = asyncio.Event(), asyncio.Event()
        async with ObservedGate(policy, probe, sample_seconds=3600) as gate:
            agent = Agent(config, gate=gate)
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(observe(unplugged_seen, replugged_seen))
                group.create_task(agent.run())
                serving = group.create_task(aggregator.run())

                held = await asyncio.to_thread(open, fifo, "wb")  # returns once batch 3 is being computed
                write_power(sysfs, plugged=False)
                assert await gate.refresh() is False
                await unplugged_seen.wait()  # the agent said why it stopped
                assert updates == []
                held.close()  # let batch 3 finish: the trainer must stop before batch 4
                await gate.waiting_again.wait()  # the interrupted attempt is over; the agent waits for power
                assert updates == []  # nothing partial went out

                write_power(sysfs, plugged=True)
                assert await gate.refresh() is True
                await serving  # the round completes with the retrained update
                await replugged_seen.wait()
                watcher.cancel()

    with Store(tmp_path / "agg.sqlite") as store:
        assert len(store.accepted_ids(1)) == 1
    assert len(updates) == 1
    assert agent.stats.trained_versions == [0]
    # the first attempt ran exactly BLOCK_AT batches, the second all of them
    n = len(DigitsTask(clients=5, alpha=0.5).train_data("agent-0"))
    full = 3 * math.ceil(n / 16)  # digits' suggested training: 3 epochs, batch size 16
    pids = calls.read_text().split()
    assert len(pids) == BLOCK_AT + full
    if isolate:  # each attempt in its own short-lived process, never in the agent's
        assert len(set(pids[:BLOCK_AT])) == 1 and len(set(pids[BLOCK_AT:])) == 1
        assert pids[0] != pids[-1] and str(os.getpid()) not in pids
    unplugged = next(p for p in presences if p.eligible is False)
    assert unplugged.device["charging"] is False and unplugged.device["battery"] == 80.0
    after = presences[presences.index(unplugged) + 1 :]
    assert any(p.state == "online" and p.eligible and p.device["charging"] for p in after)

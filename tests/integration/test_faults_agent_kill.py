"""An agent process SIGKILLed mid-upload or mid-training, then restarted on the same state folder:
its outbox republishes the same update, nothing is lost and nothing is counted twice."""

from __future__ import annotations

import asyncio

import pytest

from aggregator import Aggregator
from edge_agent import Agent
from fedge.netem import parse_schedule
from fedge_contract import ReceiptStatus
from tests.integration.faults import Observer, assert_ledger, outbox_ids, owned, sigkill, spawn_agent
from tests.integration.fleet import agent_config, aggregator_config

pytestmark = pytest.mark.integration


async def run_with_killed_agent(broker, broker_address, fleet, tmp_path, fault_proxy, *, kill_when: str) -> tuple[Observer, set[str]]:
    """Agents 0 and 1 in-process, agent 2 a real process behind a proxy link; agent 2 is SIGKILLed and restarted.

    Killed mid-training, agent 2 trains in its default child process (a window of seconds here, so the kill
    lands in it); killed mid-upload, it trains in-process, which is faster.
    """
    flags = ("--in-process-training",) if kill_when == "upload" else ()
    link = await fault_proxy.add_link("agent-2", ("127.0.0.1", broker.port))
    if kill_when == "upload":
        fault_proxy.schedule(parse_schedule("agent-2@r1^inf"))  # its upload falls into a black hole
        fault_proxy.notify_round(1)
    store = tmp_path / "agg.sqlite"
    aggregator = Aggregator(aggregator_config(broker_address, fleet, store, rounds=1, target=3, min_updates=3))
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(2)]
    async with asyncio.timeout(90), Observer(broker_address, fleet) as observer, asyncio.TaskGroup() as group:
        serving = group.create_task(aggregator.run())
        for agent in agents:
            group.create_task(agent.run())
        async with owned(await spawn_agent(link.url, fleet, "agent-2", tmp_path, tmp_path / "logs" / "agent-2.log", *flags)) as procs:
            if kill_when == "upload":
                await link.wait_for(lambda s: s.cuts == 1)
            else:  # the announcement has reached the device (a hold of v0 under delta broadcasts): it is training (or has just finished)
                await observer.until(lambda o: bool(o.global_bytes))
                await link.wait_for(lambda s: s.bytes_down >= observer.global_bytes[0])
            await sigkill(procs[0])
            pending = outbox_ids(tmp_path / "agent-2")
            link.heal()
            procs.append(await spawn_agent(link.url, fleet, "agent-2", tmp_path, tmp_path / "logs" / "agent-2-restarted.log", *flags))
            await serving
            assert await procs[1].wait() == 0
    assert_ledger(store, observer.receipts, rounds=1)
    return observer, pending


async def test_an_agent_killed_mid_upload_republishes_its_update_after_restart(broker, broker_address, fleet, tmp_path, fault_proxy):
    observer, pending = await run_with_killed_agent(broker, broker_address, fleet, tmp_path, fault_proxy, kill_when="upload")
    assert len(pending) == 1  # the update was in the outbox when the process died
    accepted = {r.update_id for r in observer.with_status(ReceiptStatus.ACCEPTED, "agent-2")}
    assert accepted == pending  # the same update, republished, not retrained
    assert not outbox_ids(tmp_path / "agent-2")


async def test_an_agent_killed_mid_training_contributes_exactly_once_after_restart(broker, broker_address, fleet, tmp_path, fault_proxy):
    observer, pending = await run_with_killed_agent(broker, broker_address, fleet, tmp_path, fault_proxy, kill_when="training")
    accepted = {r.update_id for r in observer.with_status(ReceiptStatus.ACCEPTED, "agent-2")}
    assert len(accepted) == 1
    assert not pending or accepted == pending  # if it had finished training, its outbox copy is the one that counted

"""Sharded ingestion under faults: a worker SIGKILLed mid-round, the coordinator SIGKILLed with its
workers. Rounds still complete and every accepted update is folded exactly once (the ledger)."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import psutil
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import ReceiptStatus
from tests.integration.faults import Observer, assert_ledger, owned, sigkill, spawn_aggregator
from tests.integration.fleet import ManualGate, agent_config, aggregator_config

pytestmark = pytest.mark.integration


def shard_with_updates(store_path, round_no: int) -> int:
    with Store(store_path) as store:
        return next(shard for shard, n in store.accepted_by_shard(round_no).items() if shard is not None and n > 0)


async def test_a_killed_worker_is_refolded_and_restarted(broker_address, fleet, tmp_path):
    store = tmp_path / "agg.sqlite"
    aggregator = Aggregator(aggregator_config(broker_address, fleet, store, rounds=2, target=3, min_updates=3, evaluate=False, workers=2))
    late = ManualGate(passes=0)  # agent-2 waits: round 1 cannot close before the kill
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=late if i == 2 else None) for i in range(3)]
    async with asyncio.timeout(60), Observer(broker_address, fleet) as observer, asyncio.TaskGroup() as group:
        serving = group.create_task(aggregator.run())
        for agent in agents:
            group.create_task(agent.run())
        await observer.until(lambda o: len(o.with_status(ReceiptStatus.ACCEPTED)) == 2)
        victim = shard_with_updates(store, 1)
        os.kill(aggregator.source.pool.pids[victim], signal.SIGKILL)
        await observer.until(lambda o: aggregator.source.exits == 1)  # the coordinator's own count
        late.open()
        await serving

    assert aggregator.source.exits == 1
    ledger = assert_ledger(store, observer.receipts, rounds=2)
    assert [len(ledger[r]) for r in (1, 2)] == [3, 3]
    with Store(store) as opened:
        assert set(opened.accepted_by_shard(2)) <= {0, 1}  # round 2 was ingested by the workers, the restarted one included


async def test_a_killed_coordinator_takes_its_workers_down_and_resumes(broker, broker_address, fleet, tmp_path):
    store, logs = tmp_path / "agg.sqlite", tmp_path / "logs"
    late = ManualGate(passes=0)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=late if i == 2 else None) for i in range(3)]
    flags = ("--rounds=1", "--target=3", "--min=3", "--deadline=60", "--workers=2")
    async with asyncio.timeout(90), Observer(broker_address, fleet) as observer, asyncio.TaskGroup() as group:
        for agent in agents:
            group.create_task(agent.run())
        async with owned(await spawn_aggregator(broker.url, fleet, store, logs / "agg.log", *flags)) as procs:
            await observer.until(lambda o: len(o.with_status(ReceiptStatus.ACCEPTED)) == 2)
            workers = [psutil.Process(int(pid)) for pid in re.findall(r"ingest worker \d started \(pid (\d+)\)", (logs / "agg.log").read_text())]
            assert len(workers) == 2
            await sigkill(procs[0])
            _, alive = await asyncio.to_thread(psutil.wait_procs, workers, timeout=30)  # they see end of file on stdin
            assert alive == []
            procs.append(await spawn_aggregator(broker.url, fleet, store, logs / "agg-restarted.log", *flags))
            late.open()
            assert await procs[1].wait() == 0

    restarted = (logs / "agg-restarted.log").read_text()
    assert "round 1: re-folded 2 spooled updates" in restarted and "2 ingest workers ready" in restarted
    duplicates = {r.update_id for r in observer.with_status(ReceiptStatus.DUPLICATE)}  # spooled, then killed before the receipt
    ledger = assert_ledger(store, observer.receipts, rounds=1, unreceipted_ok=duplicates)
    assert len(ledger[1]) == 3

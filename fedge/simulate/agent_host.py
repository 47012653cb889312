"""Many agents in one process, each with its own MQTT connection and state folder.

One process shares one torch import (~220 MiB) across the fleet it hosts; each agent is still a
full Agent (own client id, own persistent session, own outbox), so the broker and the aggregator
see exactly what N devices would produce. With ``--ledger`` the host writes, when its agents are
done, what each of them downloaded (``device_ledger``): the simulation report sums the catch-up
bytes of delta broadcasts from it, which only the devices know.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_agent import Agent, AgentConfig
from fedge_contract.mqtt import BrokerAddress
from fedge_tasks import load_task
from fedge_tasks.base import parse_options


async def host_agents(args: argparse.Namespace) -> int:
    options = parse_options(args.task_opt)
    task = load_task(args.task, options)  # one task object shared: data is loaded once
    # One training worker for the whole host: under the GIL, parallel training threads only
    # starve the event loop (uploads, receipts, keepalives) without training any faster.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    slow = set(filter(None, args.slow_ids.split(",")))
    attacks = dict(item.split("=", 1) for item in filter(None, args.attacks.split(",")))  # TEST ONLY (bench/poisoning)
    client_ids = args.client_ids.split(",")
    # --broker-urls: one per client id, each agent's own (faulty) link to the broker (fedge.netem)
    urls = args.broker_urls.split(",") if args.broker_urls else [args.broker] * len(client_ids)
    if len(urls) != len(client_ids):
        raise ValueError("--broker-urls needs one URL per --client-ids entry")
    brokers = {client_id: BrokerAddress.parse(url) for client_id, url in zip(client_ids, urls, strict=True)}
    agents = [
        Agent(
            AgentConfig(
                broker=brokers[client_id],
                client_id=client_id,
                state_dir=args.state_root / client_id,
                fleet=args.fleet,
                task=args.task,
                task_options=options,
                seed=args.seed,
                exit_when_final=True,
                # many agents in one process share its torch import and one training thread; the
                # host is this machine, not a device whose owner comes first
                isolate_training=False,
                train_nice=0,
                slowdown=args.slowdown if client_id in slow else 1.0,
                emulated_train_seconds=args.emulated_train_seconds,
                attack=attacks.get(client_id, "none"),
            ),
            task=task,
            executor=executor,
        )
        for client_id in client_ids
    ]
    try:
        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(agent.run(), name=agent.config.client_id)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if args.ledger is not None:
            write_ledger(args.ledger, agents)
    return 0


def device_ledger(agent: Agent) -> dict[str, Any]:
    """One agent's traffic: bytes up and down (everything under ``global/``), and its delta broadcast counters
    (``catch_up_bytes``: what it fetched to catch up or fall back, and the task)."""
    stats = agent.stats
    held = asdict(stats.held)
    return {"bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down, "catch_up_bytes": held.pop("bytes"), **held,
            "trained_versions": len(stats.trained_versions)}


def write_ledger(path: Path, agents: list[Agent]) -> None:
    path.write_text(json.dumps({"devices": {agent.config.client_id: device_ledger(agent) for agent in agents}}, indent=1))

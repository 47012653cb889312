"""Many agents in one process, each with its own MQTT connection and state folder.

One process shares one torch import (~220 MiB) across the fleet it hosts; each agent is still a
full Agent (own client id, own persistent session, own outbox), so the broker and the aggregator
see exactly what N devices would produce.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures

from edge_agent import Agent, AgentConfig
from fedge_contract.mqtt import BrokerAddress
from fedge_tasks import load_task
from fedge_tasks.base import parse_options


async def host_agents(args: argparse.Namespace) -> int:
    options = parse_options(args.task_opt)
    task = load_task(args.task, options)  # one task object shared: data is loaded once
    address = BrokerAddress.parse(args.broker)
    # One training worker for the whole host: under the GIL, parallel training threads only
    # starve the event loop (uploads, receipts, keepalives) without training any faster.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    agents = [
        Agent(
            AgentConfig(
                broker=address,
                client_id=client_id,
                state_dir=args.state_root / client_id,
                fleet=args.fleet,
                task=args.task,
                task_options=options,
                seed=args.seed,
                exit_when_final=True,
            ),
            task=task,
            executor=executor,
        )
        for client_id in args.client_ids.split(",")
    ]
    try:
        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(agent.run(), name=agent.config.client_id)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return 0

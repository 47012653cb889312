"""Agents behind a faulty network (the FaultProxy): random resets, a partition and a lost
acknowledgement force QoS 1 redeliveries and outbox replays; the aggregator dedupes them all."""

from __future__ import annotations

import asyncio

import pytest

from aggregator import Aggregator
from edge_agent import Agent
from fedge.netem import LinkProfile, parse_schedule
from fedge_contract import ReceiptStatus
from fedge_contract.mqtt import BrokerAddress
from tests.integration.faults import Observer, assert_ledger, outbox_ids
from tests.integration.fleet import agent_config, aggregator_config

pytestmark = pytest.mark.integration

ROUNDS = 3


async def test_resets_partitions_and_lost_acks_are_deduped(broker, broker_address, fleet, tmp_path, fault_proxy):
    noisy = LinkProfile(latency_ms=2, jitter_ms=2, reset_prob=0.02)
    links = [await fault_proxy.add_link(f"agent-{i}", ("127.0.0.1", broker.port), noisy) for i in range(4)]
    # agent-1's round-2 update arrives but its PUBACK and receipt fall into a 0.3 s black hole;
    # agent-2 is cut off for 0.3 s when round 3 opens
    fault_proxy.schedule(parse_schedule("agent-1@r2>0.3, agent-2@r3+0.3"))
    agents = [
        Agent(agent_config(BrokerAddress.parse(link.url), fleet, tmp_path, i, backoff_base=0.05, backoff_cap=0.5))
        for i, link in enumerate(links)
    ]
    store = tmp_path / "agg.sqlite"
    aggregator = Aggregator(aggregator_config(broker_address, fleet, store, rounds=ROUNDS, target=4, min_updates=4, evaluate=False))
    async with asyncio.timeout(90), Observer(broker_address, fleet) as observer, asyncio.TaskGroup() as group:
        serving = group.create_task(aggregator.run())
        running = [group.create_task(agent.run()) for agent in agents]
        for number in range(1, ROUNDS + 1):
            await observer.until(lambda o, number=number: o.round_open(number))
            fault_proxy.notify_round(number)
        await serving
        await asyncio.gather(*running)

    received = [r for agent in agents for r in agent.stats.receipts]
    duplicates = {r.update_id for r in received if r.status is ReceiptStatus.DUPLICATE}
    ledger = assert_ledger(store, received, rounds=ROUNDS, unreceipted_ok=duplicates)
    assert [len(ledger[n]) for n in range(1, ROUNDS + 1)] == [4] * ROUNDS
    # the lost acknowledgement made agent-1 publish its round-2 update again: answered "duplicate"
    agent_1_round_2 = {r.update_id for r in observer.with_status(ReceiptStatus.ACCEPTED, "agent-1") if r.round == 2}
    assert agent_1_round_2 and agent_1_round_2 <= {r.update_id for r in agents[1].stats.receipts if r.status is ReceiptStatus.DUPLICATE}
    assert links[1].stats.cuts == links[2].stats.cuts == 1
    assert links[1].stats.cut_resets >= 1 and links[2].stats.cut_resets >= 1
    assert all(not outbox_ids(tmp_path / f"agent-{i}") for i in range(4))

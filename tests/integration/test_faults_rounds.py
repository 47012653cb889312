"""Round semantics under slow devices: a straggler past the deadline gets ``stale``; a round below
``min`` at its deadline is extended and its model re-announced."""

from __future__ import annotations

import asyncio
import math

import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import ReceiptStatus
from fedge_contract.mqtt import BrokerAddress
from tests.integration.faults import Observer, assert_ledger
from tests.integration.fleet import ManualGate, agent_config, aggregator_config

pytestmark = pytest.mark.integration


async def test_a_straggler_past_the_deadline_gets_stale(broker, broker_address, fleet, tmp_path, fault_proxy):
    # agent-2's uplink holds its round-1 upload (no reset: a slow link, not a broken one) until round 2 is open
    slow = await fault_proxy.add_link("agent-2", ("127.0.0.1", broker.port))
    slow.cut_at_next_upload(math.inf, reset_after=False)
    addresses = [broker_address, broker_address, BrokerAddress.parse(slow.url)]
    agents = [Agent(agent_config(address, fleet, tmp_path, i)) for i, address in enumerate(addresses)]
    store = tmp_path / "agg.sqlite"
    aggregator = Aggregator(aggregator_config(broker_address, fleet, store, rounds=2, target=3, min_updates=2, deadline=1.0, evaluate=False))
    async with asyncio.timeout(60), Observer(broker_address, fleet) as observer, asyncio.TaskGroup() as group:
        serving = group.create_task(aggregator.run())
        for agent in agents:
            group.create_task(agent.run())
        await observer.until(lambda o: o.round_open(2))
        slow.heal()
        await observer.until(lambda o: bool(o.with_status(ReceiptStatus.STALE, "agent-2")))
        await serving

    stale = observer.with_status(ReceiptStatus.STALE, "agent-2")
    assert [(r.round, "round 1 on v0 is over" in r.reason) for r in stale] == [(2, True)]
    ledger = assert_ledger(store, observer.receipts, rounds=2)
    assert {r.client_id for r in observer.with_status(ReceiptStatus.ACCEPTED) if r.round == 1} == {"agent-0", "agent-1"}
    assert all(stale[0].update_id not in ids for ids in ledger.values())


async def test_a_round_below_min_at_its_deadline_is_extended_and_re_announced(broker_address, fleet, tmp_path):
    late = ManualGate(passes=0)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=late if i == 2 else None) for i in range(3)]
    store = tmp_path / "agg.sqlite"
    aggregator = Aggregator(aggregator_config(broker_address, fleet, store, rounds=1, target=3, min_updates=3, deadline=0.5, evaluate=False))
    async with asyncio.timeout(60), Observer(broker_address, fleet) as observer, asyncio.TaskGroup() as group:
        serving = group.create_task(aggregator.run())
        for agent in agents:
            group.create_task(agent.run())
        await observer.until(lambda o: len([g for g in o.globals if g.round == 1 and not g.final]) >= 2)
        late.open()
        await serving

    announced = [g for g in observer.globals if g.round == 1 and not g.final]
    assert {g.model_version for g in announced} == {0}
    assert announced[1].deadline > announced[0].deadline
    with Store(store) as db:
        assert db.rounds()[0]["extensions"] >= 1
    ledger = assert_ledger(store, observer.receipts, rounds=1)
    assert len(ledger[1]) == 3

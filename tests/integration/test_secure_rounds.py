"""``fedge aggregator --secure-aggregation``: the real coordinator runs secure rounds with real agents over
a real Mosquitto. Each new model is the previous one plus the FedAvg of the survivors' deltas (within the
fixed point's error), devices lost before or after their masked input are handled, a round that loses
too many is abandoned with its reason in RoundStatus and retried with nothing half-folded, and no agent
ever publishes an Update."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from fedge_contract import ReceiptStatus, RoundStatus, Topics
from fedge_contract.aio import cancel_and_wait
from fedge_contract.secagg import KeyAdvert, MaskedInput, Shares
from fedge_contract.secagg.topics import SecAggTopics
from tests.integration.fleet import ManualGate, agent_config, aggregator_config, raw_peer, run_fleet, zero_update
from tests.integration.secure_agents import fedavg, module, named, secure_agent

pytestmark = pytest.mark.integration
# phases end early once everyone expected answered: these deadlines only cost time where a device is lost
SECAGG = {"advertise_timeout": 8.0, "share_timeout": 8.0, "mask_timeout": 10.0, "unmask_timeout": 3.0}


def _config(broker_address, fleet, store, **overrides):
    settings = dict(rounds=2, target=5, min_updates=3, deadline=30.0, secure_aggregation=True, secagg=SECAGG)
    settings.update(overrides)
    return aggregator_config(broker_address, fleet, store, **settings)


def _steps(store_path) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """The closed rounds and each round's model step (v_r - v_{r-1}) from the store's checkpoints."""
    with Store(store_path) as store:
        rounds = store.rounds()
        versions = {v: store._db.execute("SELECT weights FROM checkpoints WHERE version=?", (v,)).fetchone()[0]
                    for v in range(len(rounds) + 1)}
    from fedge_contract.messages import unpack_weights

    weights = [unpack_weights(versions[v]) for v in range(len(rounds) + 1)]
    return rounds, [{k: weights[v + 1][k].astype(np.float64) - weights[v][k] for k in weights[v]} for v in range(len(rounds))]


def _assert_step(step, agents, round_no, spec):
    expected = fedavg(agents, round_no, spec)
    for name, values in expected.items():
        np.testing.assert_allclose(step[name], values, atol=2e-5)  # fixed point (3.7e-7 per device at 1/r) and float32 weights


async def test_secure_rounds_step_the_model_by_the_fedavg_of_the_deltas(broker_address, fleet, tmp_path):
    aggregator = Aggregator(_config(broker_address, fleet, tmp_path / "agg.sqlite"))
    agents = [secure_agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(5)]
    async with asyncio.timeout(90):
        await run_fleet(aggregator, agents)
    rounds, steps = _steps(tmp_path / "agg.sqlite")
    assert [r["accepted"] for r in rounds] == [5, 5]
    spec = aggregator.model.spec
    for number, step in enumerate(steps, start=1):
        _assert_step(step, agents, number, spec)
    assert all(r["metrics"]["secure_summed"] == 5 and r["metrics"]["secure_abandoned"] == 0 for r in rounds)
    assert rounds[-1]["metrics"]["accuracy"] > rounds[0]["metrics"]["accuracy"] - 0.05
    for agent in agents:
        assert agent.stats.trained_versions == [0, 1]
        assert agent.stats.bytes_up == 0  # no Update ever left an agent
        assert module(agent).stats.revealed == 2


async def _status(peer, topics: Topics, predicate) -> RoundStatus:
    """The next RoundStatus for which ``predicate`` holds (the peer subscribes to the status topic)."""
    while True:
        status = RoundStatus.from_bytes(await peer.next_payload(topics.status))
        if predicate(status):
            return status


async def test_devices_lost_before_and_after_their_masked_input_and_plain_updates_refused(broker_address, fleet, tmp_path):
    digits = {"clients": "6", "alpha": "0.5"}
    topics = Topics(fleet)
    aggregator = Aggregator(_config(broker_address, fleet, tmp_path / "agg.sqlite", target=6, task_options=digits))
    lose = {"agent-0": {1: Shares}, "agent-1": {1: MaskedInput}}  # round 1 only: lost before, and after, its masked input
    agents = [secure_agent(agent_config(broker_address, fleet, tmp_path, i, task_options=digits), lose=lose.get(f"agent-{i}"))
              for i in range(6)]
    subscriptions = (topics.global_model, topics.status, topics.receipt("mallory"))
    async with asyncio.timeout(120), raw_peer(broker_address, "mallory", *subscriptions) as mallory:
        serving = asyncio.create_task(run_fleet(aggregator, agents))
        await mallory.announcement(topics)  # version 0 is out (a GlobalDelta's hold under delta broadcasts, the default)
        plain = zero_update(fleet, "mallory", "plain-1", 1, 0)
        await mallory.client.publish(topics.update("mallory"), plain.to_bytes(), qos=1)
        (refused,) = await mallory.receipt_list(1)
        assert refused.status is ReceiptStatus.REJECTED and refused.reason.startswith("secure_round: round 1 is a secure"), refused
        await _status(mallory, topics, lambda s: "phase" in s.note)  # a session is running: a hostile advert is refused by it
        await mallory.client.publish(SecAggTopics(fleet).device(KeyAdvert, "mallory"), b"\xc1 not msgpack", qos=1)
        (hostile,) = await mallory.receipt_list(1)
        assert hostile.status is ReceiptStatus.REJECTED and hostile.reason.startswith("malformed:"), hostile
        await serving

    rounds, steps = _steps(tmp_path / "agg.sqlite")
    assert [r["accepted"] for r in rounds] == [5, 6]  # agent-0's input is not in round 1's sum; agent-1's is
    spec = aggregator.model.spec
    _assert_step(steps[0], named(agents, *[f"agent-{i}" for i in range(1, 6)]), 1, spec)
    _assert_step(steps[1], agents, 2, spec)
    assert rounds[0]["metrics"]["secure_invited"] == 6 and rounds[0]["metrics"]["secure_abandoned"] == 0
    assert 1 in module(agents[0]).inputs  # agent-0 trained round 1: its delta simply never left it in the clear
    assert all(agent.stats.bytes_up == 0 for agent in agents)
    with Store(tmp_path / "agg.sqlite") as store:
        receipts = {(r["client_id"], r["reason"].split(":")[0]) for r in store.receipts()}
    assert ("mallory", "secure_round") in receipts


async def test_too_many_lost_abandons_the_session_with_its_reason_then_a_retry_counts_everyone_once(broker_address, fleet, tmp_path):
    topics = Topics(fleet)
    digits = {"clients": "4", "alpha": "0.5"}
    aggregator = Aggregator(_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=4, task_options=digits))
    lose = {"agent-0": {1: Shares}, "agent-1": {1: Shares}}  # 2 masked inputs left: fewer than min_survivors 3
    agents = [secure_agent(agent_config(broker_address, fleet, tmp_path, i, task_options=digits), lose=lose.get(f"agent-{i}"))
              for i in range(4)]
    async with asyncio.timeout(120), raw_peer(broker_address, "observer", topics.status) as observer:
        serving = asyncio.create_task(run_fleet(aggregator, agents))
        status = await _status(observer, topics, lambda s: "abandoned" in s.note)
        await serving
    assert "abandoned in the mask phase: below_threshold: 2 masked inputs, fewer than min_survivors 3" in status.note, status.note
    (closed,), steps = _steps(tmp_path / "agg.sqlite")
    assert closed["accepted"] == 4 and closed["metrics"]["secure_abandoned"] == 1 and closed["metrics"]["secure_sessions"] == 2
    _assert_step(steps[0], agents, 1, aggregator.model.spec)  # nothing of the abandoned session was folded, nobody counted twice
    with Store(tmp_path / "agg.sqlite") as store:
        first, second = store.secure_sessions(1)
        assert first.abandoned and second.outcome == "summed"
        assert store._db.execute("SELECT COUNT(*) FROM secure_inputs").fetchone()[0] == 0  # released with the round
    assert all(module(a).stats.joined == 2 and module(a).stats.revealed == 1 for a in agents)


def _stored_bytes(folder: Path) -> bytes:
    """Every byte the aggregator's store holds on disk (database, WAL, spool folder)."""
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("agg.sqlite*")) if path.is_file())


def _check_nothing_recoverable(store_path: Path, agents, round_no: int) -> None:
    """What the store holds mid-round: masked inputs and checkpoints, and none of the agents' deltas."""
    everything = _stored_bytes(store_path.parent)
    with Store(store_path, readonly=True) as store:
        (session,) = store.secure_sessions(round_no)
        spooled = [MaskedInput.from_bytes(p, max_bytes=1 << 24) for p in store.secure_inputs(round_no, session.session)]
    assert len(spooled) == 3 and session.snapshot is not None
    snapshot = msgpack.unpackb(session.snapshot, raw=False)
    assert not any(isinstance(v, np.ndarray) for v in snapshot["server"].values())
    for message in spooled:
        agent = next(a for a in agents if a.config.client_id == message.sender)
        vector = module(agent).submitted[session.session]
        masked = np.frombuffer(message.data, dtype=vector.dtype)
        assert np.mean(masked == vector) < 0.02  # masked: it agrees with the device's input on no more coordinates than chance
    for agent in agents:
        if round_no in module(agent).inputs:
            for values in module(agent).inputs[round_no].delta.values():
                assert values.tobytes()[:64] not in everything, agent.config.client_id
        for vector in module(agent).submitted.values():
            assert vector.tobytes()[:64] not in everything, agent.config.client_id


@pytest.mark.parametrize("damaged", [False, True], ids=["resumed", "checkpoint-damaged"])
async def test_an_aggregator_restarted_mid_protocol_resumes_or_restarts_the_session_without_counting_twice(
        broker_address, fleet, tmp_path, damaged):
    topics = Topics(fleet)
    digits = {"clients": "4", "alpha": "0.5"}
    store = tmp_path / "agg.sqlite"
    settings = dict(rounds=1, target=4, task_options=digits, resend_grace=1.0)
    gate = ManualGate(passes=0)  # agent-3 trains only once the aggregator is back
    agents = [secure_agent(agent_config(broker_address, fleet, tmp_path / "agents", i, task_options=digits), gate=gate if i == 3 else None)
              for i in range(4)]
    async with asyncio.timeout(120), raw_peer(broker_address, "observer", topics.status) as observer, asyncio.TaskGroup() as group:
        running = [group.create_task(agent.run()) for agent in agents]
        first = asyncio.create_task(Aggregator(_config(broker_address, fleet, store, **settings)).run())
        await _status(observer, topics, lambda s: s.round == 1 and s.accepted == 3 and "mask phase" in s.note)
        await cancel_and_wait([first])  # the aggregator dies with three masked inputs spooled, one still to come
        _check_nothing_recoverable(store, agents, 1)
        if damaged:
            with Store(store) as db:
                db._db.execute("UPDATE secure_sessions SET snapshot=x'c1'")

        second = Aggregator(_config(broker_address, fleet, store, **settings))
        serving = asyncio.create_task(second.run())
        await _status(observer, topics, lambda s: s.round == 1 and "phase" in s.note)
        gate.open()
        await serving
        await asyncio.gather(*running)

    (closed,), steps = _steps(store)
    assert closed["accepted"] == 4
    _assert_step(steps[0], agents, 1, second.model.spec)  # every agent's delta once
    with Store(store) as db:
        sessions = db.secure_sessions(1)
    if damaged:
        assert [s.outcome.split(":")[:2] for s in sessions] == [["abandoned", " resume_failed"], ["summed"]]  # type: ignore[union-attr]
        assert all(module(a).stats.revealed == 1 and module(a).stats.joined == 2 for a in agents[:3])
    else:
        assert [s.outcome for s in sessions] == ["summed"] and all(module(a).stats.joined == 1 for a in agents)


async def test_a_broker_restart_mid_protocol_loses_nothing(broker, broker_address, fleet, tmp_path):
    topics = Topics(fleet)
    digits = {"clients": "4", "alpha": "0.5"}
    store = tmp_path / "agg.sqlite"
    gate = ManualGate(passes=0)  # agent-3 trains only after the broker is back
    agents = [secure_agent(agent_config(broker_address, fleet, tmp_path, i, task_options=digits, backoff_cap=1.0),
                           gate=gate if i == 3 else None) for i in range(4)]
    aggregator = Aggregator(_config(broker_address, fleet, store, rounds=1, target=4, task_options=digits, resend_grace=1.0))
    async with asyncio.timeout(120), asyncio.TaskGroup() as group:
        serving = group.create_task(aggregator.run())
        for agent in agents:
            group.create_task(agent.run())
        async with raw_peer(broker_address, "observer", topics.status) as observer:
            await _status(observer, topics, lambda s: s.accepted == 3 and "mask phase" in s.note)
        await broker.kill()
        await broker.start()
        gate.open()
        await serving

    (closed,), steps = _steps(store)
    assert closed["accepted"] == 4 and closed["metrics"]["secure_sessions"] == 1  # the same session, its messages republished
    _assert_step(steps[0], agents, 1, aggregator.model.spec)

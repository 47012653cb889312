"""Cohorts and federated evaluation on real agents over a real Mosquitto.

The test plays the aggregator's announcing side with a raw MQTT client (the aggregator's round
loop is wired to cohorts separately): it publishes retained GlobalModels whose ``cohort`` field
invites some devices and asks some to evaluate, and watches the updates and reports that come back.
"""

from __future__ import annotations

import asyncio

import pytest

from aggregator import Aggregator
from aggregator.observability.federated_eval import EvalCollector
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import GlobalModel, TaskConfig, Topics, Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.cohort import EVAL_ALL, InviteSet, Participation
from fedge_contract.evaluation import EvalReport
from fedge_contract.tensors import ModelSpec
from fedge_tasks.digits import DigitsTask
from fedge_tasks.loops import evaluate
from fedge_tasks.weights import get_weights
from tests.integration.fleet import ManualGate, RawPeer, agent_config, aggregator_config, raw_peer, run_fleet

pytestmark = pytest.mark.integration

TASK = DigitsTask(clients=5, alpha=0.5)


def announcement(fleet: str, version: int, invited: list[str] | None, *, eval_all: bool = False, final: bool = False) -> GlobalModel:
    weights = get_weights(TASK.build_model())
    invite = None if invited is None else InviteSet.of(invited, fleet=fleet, round_no=version + 1, bits=16)
    return GlobalModel(
        fleet=fleet, model_version=version, round=version + 1, deadline=None, task=TaskConfig(local_epochs=1, batch_size=16, lr=0.1),
        fingerprint=ModelSpec.of(weights).fingerprint, tensors=encode_weights(weights, parse_chain("none")), final=final,
        cohort=Participation(invite, EVAL_ALL if eval_all else None),
    )


class WatchedGate(ManualGate):
    """ManualGate that says when someone first waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()

    async def wait_eligible(self) -> None:
        self.asked.set()
        await super().wait_eligible()


async def next_of(peer: RawPeer, topics: Topics, *, updates: int = 0, evals: int = 0) -> tuple[list[Update], list[EvalReport]]:
    got_updates: list[Update] = []
    got_evals: list[EvalReport] = []
    async for message in peer.client.messages:
        topic, payload = str(message.topic), message.payload
        assert isinstance(payload, bytes)
        if "/updates/" in topic:
            got_updates.append(Update.from_bytes(payload, max_bytes=1 << 24))
        elif "/evals/" in topic:
            got_evals.append(EvalReport.from_bytes(payload))
        if len(got_updates) >= updates and len(got_evals) >= evals:
            return got_updates, got_evals
    raise AssertionError("connection closed")


async def test_only_invited_devices_train_and_a_late_joiner_learns_its_invitation(broker_address, fleet, tmp_path):
    topics = Topics(fleet)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(3)]
    async with asyncio.timeout(90), raw_peer(broker_address, "announcer", topics.all_updates, topics.all_evals) as peer:
        running = [asyncio.create_task(a.run()) for a in agents[:2]]
        # round 1 invites agent-1 only, and asks everyone to evaluate v0
        await peer.client.publish(topics.global_model, announcement(fleet, 0, ["agent-1"], eval_all=True).to_bytes(), qos=1, retain=True)
        updates, evals = await next_of(peer, topics, updates=1, evals=2)
        assert [(u.client_id, u.round) for u in updates] == [("agent-1", 1)]
        assert sorted(e.client_id for e in evals) == ["agent-0", "agent-1"] and {e.model_version for e in evals} == {0}
        # round 2 invites agent-0 and agent-2, which only starts now: it learns from the retained announcement
        await peer.client.publish(topics.global_model, announcement(fleet, 1, ["agent-0", "agent-2"]).to_bytes(), qos=1, retain=True)
        running.append(asyncio.create_task(agents[2].run()))
        updates, evals = await next_of(peer, topics, updates=2)
        assert sorted((u.client_id, u.round) for u in updates) == [("agent-0", 2), ("agent-2", 2)] and not evals
        # the final model asks for evaluations: the agents evaluate it, then exit (exit_when_final)
        await peer.client.publish(topics.global_model, announcement(fleet, 2, None, eval_all=True, final=True).to_bytes(),
                                  qos=1, retain=True)
        await asyncio.gather(*running)
    assert agents[0].stats.trained_versions == [1] and agents[1].stats.trained_versions == [0] and agents[2].stats.trained_versions == [1]
    assert [r.model_version for r in agents[2].evaluations.reports] == [2]  # joined after v0's request, evaluated the final model
    assert all(r.model_version == 2 for a in agents for r in a.evaluations.reports[-1:])


async def test_evaluation_waits_for_eligibility_and_reports_what_the_device_computes(broker_address, fleet, tmp_path):
    """In a child process, like a real device: the report is the device's own held-out split's evaluation."""
    topics = Topics(fleet)
    gate = WatchedGate()
    gate.close()
    agent = Agent(agent_config(broker_address, fleet, tmp_path, 3, isolate_training=True), gate=gate)
    async with asyncio.timeout(90), raw_peer(broker_address, "announcer", topics.all_updates, topics.all_evals) as peer:
        running = asyncio.create_task(agent.run())
        model = announcement(fleet, 0, [], eval_all=True)  # nobody trains, everyone evaluates
        await peer.client.publish(topics.global_model, model.to_bytes(), qos=1, retain=True)
        # not invited, so only the evaluation can ask the gate; the closed gate holds it
        await gate.asked.wait()
        assert agent.evaluations.reports == []
        gate.open()
        updates, evals = await next_of(peer, topics, evals=1)
        agent.stop()
        await running
    data = TASK.eval_data("agent-3")
    assert data is not None
    expected = evaluate(TASK.build_model(), data)
    [report] = evals
    assert not updates and report.client_id == "agent-3" and report.num_samples == len(data) == expected["num_samples"]
    assert report.accuracy == pytest.approx(expected["accuracy"]) and report.loss == pytest.approx(expected["loss"], rel=1e-5)
    collector = EvalCollector(fleet, 0, model.cohort)  # type: ignore[arg-type]
    assert collector.offer("agent-3", report.to_bytes()) is None and collector.metrics().accuracy == report.accuracy  # type: ignore[union-attr]


async def test_a_run_without_server_side_eval_data_completes(broker_address, fleet, tmp_path):
    """The task has held-out data on devices only: the aggregator evaluates nothing and still finishes."""
    task_spec = "tests.integration.device_eval_task:DeviceEvalOnly"
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", task=task_spec, rounds=2, target=3, min_updates=3,
                               task_options={"clients": "3", "alpha": "0.5"})
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i, task=task_spec, task_options={"clients": "3", "alpha": "0.5"}))
              for i in range(3)]
    async with asyncio.timeout(120):
        await run_fleet(aggregator, agents)
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        rounds = store.rounds()
    assert [r["round"] for r in rounds] == [1, 2] and all("accuracy" not in r["metrics"] for r in rounds)
    assert all(a.stats.trained_versions == [0, 1] for a in agents)

"""Cohort selection and federated evaluation in the aggregator's round loop, against a real Mosquitto.

Devices are raw MQTT peers where the test must decide who does what (presence, an update, a
dropout), and real agents where training and evaluation themselves are under test.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.rounds.cohort import Candidate, CohortPolicy, CohortSelector
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import GlobalModel, Presence, Receipt, ReceiptStatus, Topics
from fedge_contract.aio import cancel_and_wait
from fedge_contract.broadcast import GlobalDelta, Rebuilder
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.tensors import ModelSpec
from fedge_tasks.loops import evaluate
from fedge_tasks.weights import get_weights, set_weights
from tests.integration.device_eval_task import DeviceEvalOnly
from tests.integration.faults import Observer
from tests.integration.fleet import RawPeer, agent_config, aggregator_config, raw_peer, run_fleet, zero_update

pytestmark = pytest.mark.integration


class Devices:
    """Raw peers that check in (retained presence) and answer invitations as the test says."""

    def __init__(self, peer: RawPeer, topics: Topics) -> None:
        self.peer = peer
        self.topics = topics

    async def presence(self, *clients: str, state: str = "online") -> None:
        for client in clients:
            payload = Presence(self.topics.fleet, client, state, eligible=True).to_bytes()
            await self.peer.client.publish(self.topics.presence(client), payload, qos=1, retain=True)

    async def announcement(self, *, version: int, invited: int | None = None) -> GlobalModel | GlobalDelta:
        """The next announcement of ``version`` (with ``invited``: one whose cohort has that many devices), a
        GlobalDelta under delta broadcasts (the default): the cohort travels in either."""
        while True:
            model = await self.peer.announcement(self.topics)
            count = model.cohort.invited.count if model.cohort and model.cohort.invited else None
            if model.model_version == version and not model.final and (invited is None or count == invited):
                return model

    async def send(self, model: GlobalModel | GlobalDelta, client: str) -> Receipt:
        """A well-formed zero update from ``client`` for ``model``'s round, and its receipt."""
        update = zero_update(model.fleet, client, f"{client}-r{model.round}", model.round, model.model_version)
        await self.peer.client.publish(self.topics.update(client), update.to_bytes(), qos=1)
        async for message in self.peer.client.messages:
            if str(message.topic) == self.topics.receipt(client):
                return Receipt.from_bytes(message.payload)  # type: ignore[arg-type]
        raise AssertionError("connection closed")


def invited(model: GlobalModel | GlobalDelta, clients: Iterable[str]) -> set[str]:
    assert model.cohort is not None
    return {c for c in clients if model.cohort.invites(c, fleet=model.fleet, round_no=model.round)}


@asynccontextmanager
async def devices(address: BrokerAddress, fleet: str, clients: list[str]) -> AsyncIterator[Devices]:
    topics = Topics(fleet)
    async with raw_peer(address, f"{fleet}-devices", topics.global_model, *(topics.receipt(c) for c in clients)) as peer:
        yield Devices(peer, topics)


@asynccontextmanager
async def running(aggregator: Aggregator) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(aggregator.run())
    try:
        yield task
    finally:
        await cancel_and_wait([task])


CLIENTS = [f"dev-{i}" for i in range(6)]


@pytest.mark.parametrize("workers", [0, 1])
async def test_an_uninvited_update_is_refused_and_the_cohort_is_the_seeds(broker_address, fleet, tmp_path, workers):
    """Six devices check in; a round of target 2 at over-selection 1.5 invites exactly the three the
    selection rule draws for the seed; an update from another device is refused (``not_invited``)
    with a receipt, in this process or an ingest worker, and the invited ones' close the round."""
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2, over_select=1.5,
                               seed=11, evaluate=False, workers=workers)
    async with asyncio.timeout(90), devices(broker_address, fleet, CLIENTS) as fleet_devices:
        await fleet_devices.presence(*CLIENTS)
        aggregator = Aggregator(config)
        async with running(aggregator) as serving:
            model = await fleet_devices.announcement(version=0)
            cohort = invited(model, CLIENTS)
            expected = CohortSelector(CohortPolicy(target=2, over_select=1.5, seed=11)).select(1, [Candidate(c) for c in CLIENTS]).invited
            assert cohort == expected and len(cohort) == 3
            outsider = sorted(set(CLIENTS) - cohort)[0]
            refused = await fleet_devices.send(model, outsider)
            assert refused.status is ReceiptStatus.REJECTED and refused.reason.startswith("not_invited:")
            for client in sorted(cohort)[:2]:
                assert (await fleet_devices.send(model, client)).status is ReceiptStatus.ACCEPTED
            await serving
    assert aggregator.counters["rejected:not_invited"] == 1
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        assert store.invited(1) == sorted(expected)
        [row] = store.rounds()
        assert row["accepted"] == 2 and row["metrics"]["invited"] == 3.0 and row["metrics"]["invited_trained"] == 2.0


async def test_devices_that_check_in_after_the_round_opened_are_invited_before_its_deadline(broker_address, fleet, tmp_path):
    """The round opens before any device checked in; two check in one right after the other (inside one top-up
    interval): both are invited by re-announcements long before the deadline, not the second at its extension."""
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2, over_select=1.0,
                               deadline=60.0, checkin=0.0, evaluate=False)  # no wait for check-ins: the round opens at once
    async with asyncio.timeout(20), devices(broker_address, fleet, CLIENTS) as fleet_devices:
        async with running(Aggregator(config)) as serving:
            opened = await fleet_devices.announcement(version=0)
            assert not invited(opened, CLIENTS)  # nobody had checked in
            await fleet_devices.presence("dev-0")
            await fleet_devices.announcement(version=0, invited=1)
            await fleet_devices.presence("dev-1")  # within a second of the top-up that invited dev-0
            both = await fleet_devices.announcement(version=0, invited=2)
            assert invited(both, CLIENTS) == {"dev-0", "dev-1"}
            for client in ("dev-0", "dev-1"):
                assert (await fleet_devices.send(both, client)).status is ReceiptStatus.ACCEPTED
            await serving
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        [row] = store.rounds()
    assert row["extensions"] == 0


async def test_a_selected_device_that_drops_out_is_replaced_on_extension(broker_address, fleet, tmp_path):
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2, over_select=1.0,
                               deadline=2.0, evaluate=False)
    async with asyncio.timeout(90), devices(broker_address, fleet, CLIENTS) as fleet_devices:
        await fleet_devices.presence(*CLIENTS)
        async with running(Aggregator(config)) as serving:
            model = await fleet_devices.announcement(version=0)
            first = sorted(invited(model, CLIENTS))
            assert len(first) == 2
            stays, drops = first
            await fleet_devices.presence(drops, state="offline")  # its last will, say
            assert (await fleet_devices.send(model, stays)).status is ReceiptStatus.ACCEPTED
            # the deadline passes with 1 < min 2: the extension invites one online device in place of the dropout
            extended = await fleet_devices.announcement(version=0, invited=3)
            [newcomer] = invited(extended, CLIENTS) - set(first)
            assert newcomer not in first
            assert (await fleet_devices.send(extended, newcomer)).status is ReceiptStatus.ACCEPTED
            await serving
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        assert store.invited(1) == sorted([*first, newcomer]) and set(store.accepted_ids(1)) == {f"{stays}-r1", f"{newcomer}-r1"}
        assert store.rounds()[0]["extensions"] >= 1


async def test_a_restarted_aggregator_announces_the_same_cohort_for_its_resumed_round(broker_address, fleet, tmp_path):
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2, over_select=1.5,
                               evaluate=False, resend_grace=0.0)
    async with asyncio.timeout(90), devices(broker_address, fleet, CLIENTS) as fleet_devices:
        await fleet_devices.presence(*CLIENTS)
        async with running(Aggregator(config)):
            before = await fleet_devices.announcement(version=0)
            cohort = invited(before, CLIENTS)
        # the aggregator died mid-round; meanwhile two invited devices went away and new ones came: a new
        # draw would differ, the resumed round must not
        gone = sorted(cohort)[:2]
        await fleet_devices.presence(*gone, state="offline")
        await fleet_devices.presence("dev-6", "dev-7")
        async with running(Aggregator(config)) as serving:
            after = await fleet_devices.announcement(version=0)
            assert after.cohort == before.cohort and invited(after, [*CLIENTS, "dev-6", "dev-7"]) == cohort
            for client in sorted(cohort - set(gone))[:1] + gone[:1]:
                assert (await fleet_devices.send(after, client)).status is ReceiptStatus.ACCEPTED
            await serving


def _checkpoint_versions(store: Path) -> list[int]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return [version for (version,) in db.execute("SELECT version FROM checkpoints ORDER BY version")]


def _held_models(announcements: Iterable[GlobalModel | GlobalDelta], first: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """Each version as devices hold it (what they evaluate), rebuilt from the announcements as a device does:
    under delta broadcasts the sum of the decoded deltas from its own build of version 0, not the checkpoint."""
    rebuilder = Rebuilder.from_build(ModelSpec.of(first), first)
    held = {0: dict(first)}
    for announced in announcements:
        if announced.model_version not in held:
            held[announced.model_version] = dict(rebuilder.accept(announced).weights)  # hash-checked against the aggregator's
    return held


async def test_federated_metrics_equal_a_hand_computation_without_server_side_data(broker_address, fleet, tmp_path):
    """Three agents on a task whose held-out data lives on the devices only: every version is evaluated
    by every device (fraction 1), the aggregator evaluates nothing, and each round's stored federated
    figures are the sample-weighted evaluation of its model, as devices hold it, over their own splits."""
    options = {"clients": "3", "alpha": "0.5"}
    task_spec = "tests.integration.device_eval_task:DeviceEvalOnly"
    store_path = tmp_path / "agg.sqlite"
    config = aggregator_config(broker_address, fleet, store_path, task=task_spec, task_options=options, rounds=2, target=3,
                               min_updates=3, eval_every=1, eval_fraction=1.0)
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i, task=task_spec, task_options=options)) for i in range(3)]
    async with asyncio.timeout(120), Observer(broker_address, fleet) as observer:
        await run_fleet(aggregator, agents)
        await observer.until(lambda o: any(a.final for a in o.globals))
    with Store(store_path, readonly=True) as store:
        rounds = {r["round"]: r["metrics"] for r in store.rounds()}
    task = DeviceEvalOnly(clients=3, alpha=0.5)
    model = task.build_model()
    held = _held_models(observer.globals, get_weights(model))
    assert sorted(held) == _checkpoint_versions(store_path) == [0, 1, 2]
    for version, weights in held.items():
        if version == 0:
            continue  # v0 has no round: its figures are published, not stored
        set_weights(model, weights)
        results = [evaluate(model, task.eval_data(f"agent-{i}")) for i in range(3)]
        samples = sum(r["num_samples"] for r in results)
        metrics = rounds[version]
        assert "accuracy" not in metrics  # no server-side evaluation
        assert metrics["fed_devices"] == 3 and metrics["fed_samples"] == samples and metrics["fed_version"] == version
        assert metrics["fed_accuracy"] == pytest.approx(sum(r["num_samples"] * r["accuracy"] for r in results) / samples)
        assert metrics["fed_loss"] == pytest.approx(sum(r["num_samples"] * r["loss"] for r in results) / samples, rel=1e-5)
        assert metrics["fed_accuracy_min"] == pytest.approx(min(r["accuracy"] for r in results))
    assert aggregator.announcer.last_metrics["fed_version"] == 2
    registry = aggregator.metrics.registry
    assert registry.get_sample_value("fedge_evals_total", {"status": "accepted", "reason": ""}) == 9  # v0, v1, v2 by three devices
    assert registry.get_sample_value("fedge_federated_accuracy") == rounds[2]["fed_accuracy"]

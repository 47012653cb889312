"""Sharded ingestion (``--workers``): two worker processes behind a shared subscription on a real
Mosquitto make the model a single aggregator makes, dedupe and the round's target hold across
them, and hand-made payloads let the test pin every figure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from fedge_contract import GlobalModel, ReceiptStatus, Topics, Update
from fedge_contract.broadcast import GlobalDelta
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress
from tests.integration.faults import Observer
from tests.integration.fleet import aggregator_config, digits_spec, raw_peer

pytestmark = pytest.mark.integration


def payload(model: GlobalModel | GlobalDelta, client: str, update_id: str, *, seed: int, num_samples: int = 10) -> bytes:
    """A deterministic update to the announced ``model`` (seeded N(0, 0.01) delta of the digits model's shapes)."""
    rng = np.random.default_rng(seed)
    delta = {t.name: rng.normal(0.0, 0.01, t.shape).astype(np.float32) for t in digits_spec().tensors}
    return Update(model.fleet, client, update_id, model.round, model.model_version, num_samples,
                  encode_weights(delta, parse_chain("none"))).to_bytes()


@contextlib.asynccontextmanager
async def serving(aggregator: Aggregator) -> AsyncIterator[asyncio.Task[None]]:
    """The aggregator running as a task; cancelled (its workers stopped) if the block leaves early."""
    task = asyncio.create_task(aggregator.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def feed(address: BrokerAddress, fleet: str, *, rounds: int, clients: int) -> None:
    """Publish ``clients`` seeded updates per round, each round once its model is out; every one must be accepted."""
    topics = Topics(fleet)
    async with Observer(address, fleet) as observer, raw_peer(address, f"feeder-{fleet}"[:64]) as peer:
        for number in range(1, rounds + 1):
            await observer.until(lambda o, number=number: model_of(o, number - 1) is not None)
            model = model_of(observer, number - 1)
            for i in range(clients):
                data = payload(model, f"c{i}", f"r{number}-c{i}", seed=100 * number + i, num_samples=10 + i)
                await peer.client.publish(topics.update(f"c{i}"), data, qos=1)
        await observer.until(lambda o: len(o.receipts) == rounds * clients)
        assert {r.status for r in observer.receipts} == {ReceiptStatus.ACCEPTED}, observer.receipts


def model_of(observer: Observer, version: int) -> GlobalModel | GlobalDelta | None:
    return next((m for m in observer.globals if m.model_version == version and not m.final), None)


def final_weights(store: Path) -> dict[str, np.ndarray]:
    with Store(store) as opened:
        checkpoint = opened.latest_checkpoint()
    assert checkpoint is not None
    return checkpoint.weights


async def test_two_workers_make_the_single_aggregators_model(broker_address, fleet, tmp_path):
    results = {}
    for workers in (0, 2):
        name, store = f"{fleet}-w{workers}", tmp_path / f"w{workers}.sqlite"
        config = aggregator_config(broker_address, name, store, rounds=2, target=6, min_updates=6, evaluate=False, workers=workers,
                                   over_select=0)  # a raw feeder, no presence: no cohort
        aggregator = Aggregator(config)
        async with asyncio.timeout(40), serving(aggregator) as task:
            await feed(broker_address, name, rounds=2, clients=6)
            await task
        results[workers] = final_weights(store)
        with Store(store) as opened:
            shards = [opened.accepted_by_shard(r) for r in (1, 2)]
            assert [len(opened.accepted_ids(r)) for r in (1, 2)] == [6, 6]
        if workers:
            assert aggregator.counters["accepted"] == 12 and aggregator.counters["bytes_in"] > 0  # counted from the workers' reports
            for by_shard in shards:  # both workers ingested (Mosquitto deals shared subscriptions round-robin)
                assert set(by_shard) == {0, 1} and all(n > 0 for n in by_shard.values()), by_shard
        else:
            assert shards == [{None: 6}, {None: 6}]
    for name, values in results[0].items():
        np.testing.assert_allclose(results[2][name], values, rtol=1e-6, atol=1e-8)


async def test_dedupe_and_the_target_hold_across_workers(broker_address, fleet, tmp_path):
    topics = Topics(fleet)
    store = tmp_path / "agg.sqlite"
    config = aggregator_config(broker_address, fleet, store, rounds=2, target=3, min_updates=3, evaluate=False, workers=2,
                               over_select=0)  # raw peers, no presence: no cohort
    aggregator = Aggregator(config)
    async with asyncio.timeout(40), serving(aggregator), Observer(broker_address, fleet) as observer, \
            raw_peer(broker_address, f"peer-{fleet}"[:64]) as peer:

        async def answers(seen: int, count: int) -> list[str]:
            """The statuses of the ``count`` receipts after the first ``seen`` (counted before
            publishing: an answer may arrive before the last publish returns)."""
            await observer.until(lambda o: len(o.receipts) >= seen + count)
            return sorted(r.status.value for r in observer.receipts[seen:])

        await observer.until(lambda o: model_of(o, 0) is not None)
        model = model_of(observer, 0)

        # the same update twice, back to back: round-robin hands the copies to different workers
        twice = payload(model, "c1", "same-id", seed=1)
        seen = len(observer.receipts)
        for _ in range(2):
            await peer.client.publish(topics.update("c1"), twice, qos=1)
        assert await answers(seen, 2) == ["accepted", "duplicate"]

        # one client, two different updates in one round
        seen = len(observer.receipts)
        for update_id in ("c2-first", "c2-second"):
            await peer.client.publish(topics.update("c2"), payload(model, "c2", update_id, seed=2), qos=1)
        assert await answers(seen, 2) == ["accepted", "duplicate"]
        assert "already contributed to round 1" in observer.with_status(ReceiptStatus.DUPLICATE, "c2")[0].reason

        # four updates for the round's last place: exactly one gets it
        seen = len(observer.receipts)
        for i in range(3, 7):
            await peer.client.publish(topics.update(f"c{i}"), payload(model, f"c{i}", f"late-{i}", seed=i), qos=1)
        assert await answers(seen, 4) == ["accepted", "stale", "stale", "stale"]
        await observer.until(lambda o: model_of(o, 1) is not None)  # round 1 closed from exactly its target

    with Store(store) as opened:
        accepted = set(opened.accepted_ids(1))
        assert len(accepted) == 3 and {"same-id"} < accepted and len(accepted & {"c2-first", "c2-second"}) == 1
        assert sum(opened.accepted_by_shard(1).values()) == 3
        assert opened.rounds()[0]["accepted"] == 3 and opened.rounds()[0]["closed"] is not None

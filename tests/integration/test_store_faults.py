"""A store that fails under the aggregator stops it with the store's error: no update is answered
from a state the disk did not keep, and the aggregator does not hang on."""

from __future__ import annotations

import asyncio
import sqlite3

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from fedge_contract import Topics, Update
from fedge_contract.codecs import encode_weights, parse_chain
from tests.integration.fleet import aggregator_config, raw_peer

pytestmark = pytest.mark.integration


async def test_receipts_the_full_disk_refuses_stop_the_aggregator(broker_address, fleet, tmp_path, monkeypatch):
    def disk_full(self: Store, rows: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "record_receipts", disk_full)
    topics = Topics(fleet)
    aggregator = Aggregator(aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2,
                                              evaluate=False, over_select=0))  # raw peers, no presence: no cohort
    async with asyncio.timeout(60), raw_peer(broker_address, "peer", topics.global_model, topics.receipt("a")) as peer:
        serving = asyncio.create_task(aggregator.run())
        model = await peer.first_model(topics)
        delta = {t.name: np.zeros(t.shape, np.float32) for t in model.tensors}
        update = Update(fleet, "a", "u1", model.round, model.model_version, 10, encode_weights(delta, parse_chain("none")))
        await peer.client.publish(topics.update("a"), update.to_bytes(), qos=1)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            await serving
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        assert store.is_accepted("u1") and store.receipts() == []  # spooled (its resend gets "duplicate"), never answered

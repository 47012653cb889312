"""The ingest path's group commit: receipts wait, in order, until the store is durable."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from aggregator import ingest as ingest_module
from aggregator.config import AggregatorConfig
from aggregator.defence import Defence
from aggregator.ingest import Ingest, LedgerAdmission, limits_for
from aggregator.store import Store
from fedge_contract import Receipt, ReceiptStatus, Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.tensors import ModelSpec, TensorSpec

SPEC = ModelSpec((TensorSpec("w", (3,)),))
CONFIG = AggregatorConfig(broker=BrokerAddress.parse("mqtt://127.0.0.1:1883"))


@pytest.fixture
def events() -> list[tuple[str, object]]:
    return []


@pytest.fixture
def store(tmp_path: Path, events: list[tuple[str, object]]) -> Store:
    with Store(tmp_path / "agg.sqlite") as opened:
        opened.open_round(1, 0, None)
        sync = opened.sync

        def recorded_sync() -> None:
            events.append(("sync", None))
            sync()

        opened.sync = recorded_sync  # type: ignore[method-assign]
        yield opened


def make_ingest(store: Store, events: list[tuple[str, object]], loop: asyncio.AbstractEventLoop | None = None,
                sent: asyncio.Event | None = None) -> Ingest:
    def send(topic: str, payload: bytes) -> None:
        events.append(("send", Receipt.from_bytes(payload)))
        if sent is not None:
            sent.set()

    return Ingest(fleet="default", spec=SPEC, limits=limits_for(CONFIG, SPEC), defence=Defence(CONFIG), store=store,
                  send=send, answered=lambda *a: None, log=logging.getLogger("test"), loop=loop)


@pytest.fixture
def ingest(store: Store, events: list[tuple[str, object]]) -> Ingest:
    return make_ingest(store, events)  # no loop: only explicit releases


def update(client: str, update_id: str, value: float = 1.0) -> bytes:
    tensors = encode_weights({"w": np.full(3, value, np.float32)}, parse_chain("none"))
    return Update("default", client, update_id, 1, 0, 10, tensors).to_bytes()


def admission(store: Store) -> LedgerAdmission:
    return LedgerAdmission(store, number=1, base_version=0, target=10)


def test_receipts_wait_for_release_which_syncs_the_store_first(ingest: Ingest, store: Store, events: list) -> None:
    assert ingest.handle("a", update("a", "u1"), admission(store)) is not None
    assert ingest.handle("a", update("a", "u1"), admission(store)) is None  # the same update again
    assert ingest.handle("b", b"\x00garbage", admission(store)) is None
    assert events == [] and ingest.unsent == 3  # accepted, spooled, folded: nothing said yet
    assert store.is_accepted("u1") and ingest.collector.count == 1

    assert ingest.release() == 3
    assert [kind for kind, _ in events] == ["sync", "send", "send", "send"]
    receipts = [receipt for kind, receipt in events if kind == "send"]
    assert [(r.update_id, r.status) for r in receipts] == [  # in the order they were decided
        ("u1", ReceiptStatus.ACCEPTED), ("u1", ReceiptStatus.DUPLICATE), (None, ReceiptStatus.REJECTED),
    ]
    assert ingest.unsent == 0 and ingest.release() == 0 and len(events) == 4  # nothing queued: no sync either


def test_a_full_batch_is_due_at_once(ingest: Ingest, store: Store) -> None:
    for i in range(ingest_module.RELEASE_EVERY - 1):
        ingest.handle(f"c{i}", b"junk", admission(store))
    assert not ingest.due()
    ingest.handle("last", b"junk", admission(store))
    assert ingest.due()


async def test_the_timer_releases_what_waits_and_a_release_disarms_it(store: Store, events: list) -> None:
    sent = asyncio.Event()
    ingest = make_ingest(store, events, asyncio.get_running_loop(), sent)
    ingest.handle("a", update("a", "u1"), admission(store))
    ingest.handle("b", update("b", "u2"), admission(store))
    assert events == []
    async with asyncio.timeout(5):
        await sent.wait()  # the timer fires RELEASE_AFTER after the first receipt was queued
    assert [kind for kind, _ in events] == ["sync", "send", "send"]

    ingest.handle("c", update("c", "u3"), admission(store))
    assert ingest.release() == 1  # explicitly, before the timer
    ingest.handle("d", update("d", "u4"), admission(store))
    ingest.close()  # its owner stops: nothing fires afterwards
    await asyncio.sleep(3 * ingest_module.RELEASE_AFTER)  # a check that nothing happens needs the time to pass
    assert [kind for kind, _ in events].count("send") == 3 and ingest.unsent == 1

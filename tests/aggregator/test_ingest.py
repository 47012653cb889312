"""The ingest path's group commit: receipts wait, in order, until the store is durable."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from aggregator.aggregation.defence import Defence
from aggregator.config import config_of
from aggregator.ingest import pipeline as ingest_module
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.validation import limits_for
from aggregator.rounds.sync import LedgerAdmission
from aggregator.store import InlineStore, Store
from fedge_contract import Receipt, ReceiptStatus, Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.tensors import ModelSpec, TensorSpec

SPEC = ModelSpec((TensorSpec("w", (3,)),))
CONFIG = config_of(BrokerAddress.parse("mqtt://127.0.0.1:1883"))


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
        sync_soon = opened.sync_soon

        def recorded_sync_soon() -> concurrent.futures.Future[None]:
            events.append(("sync", None))
            return sync_soon()

        opened.sync_soon = recorded_sync_soon  # type: ignore[method-assign]
        yield opened


def make_ingest(store: Store, events: list[tuple[str, object]], loop: asyncio.AbstractEventLoop | None = None,
                sent: asyncio.Event | None = None) -> Ingest:
    def send(topic: str, payload: bytes) -> None:
        events.append(("send", Receipt.from_bytes(payload)))
        if sent is not None:
            sent.set()

    return Ingest(fleet="default", spec=SPEC, limits=limits_for(CONFIG, SPEC), defence=Defence(CONFIG), db=InlineStore(store),
                  send=send, answered=lambda *a: None, log=logging.getLogger("test"), loop=loop)


@pytest.fixture
def ingest(store: Store, events: list[tuple[str, object]]) -> Ingest:
    return make_ingest(store, events)  # no loop: only explicit releases


def update(client: str, update_id: str, value: float = 1.0) -> bytes:
    tensors = encode_weights({"w": np.full(3, value, np.float32)}, parse_chain("none"))
    return Update("default", client, update_id, 1, 0, 10, tensors).to_bytes()


def admission(store: Store) -> LedgerAdmission:
    return LedgerAdmission(store, number=1, base_version=0, target=10)


async def test_receipts_wait_for_release_which_syncs_the_store_first(ingest: Ingest, store: Store, events: list) -> None:
    assert await ingest.handle("a", update("a", "u1"), admission(store)) is not None
    assert await ingest.handle("a", update("a", "u1"), admission(store)) is None  # the same update again
    assert await ingest.handle("b", b"\x00garbage", admission(store)) is None
    assert events == [] and ingest.unsent == 3  # accepted, spooled, folded: nothing said yet
    assert store.is_accepted("u1") and ingest.collector.count == 1

    assert ingest.release() == 3
    assert [kind for kind, _ in events] == ["sync", "send", "send", "send"]
    receipts = [receipt for kind, receipt in events if kind == "send"]
    assert [(r.update_id, r.status) for r in receipts] == [  # in the order they were decided
        ("u1", ReceiptStatus.ACCEPTED), ("u1", ReceiptStatus.DUPLICATE), (None, ReceiptStatus.REJECTED),
    ]
    assert ingest.unsent == 0 and ingest.release() == 0 and len(events) == 4  # nothing queued: no sync either


async def test_a_full_batch_is_due_at_once(ingest: Ingest, store: Store) -> None:
    for i in range(ingest_module.RELEASE_EVERY - 1):
        await ingest.handle(f"c{i}", b"junk", admission(store))
    assert not ingest.due()
    await ingest.handle("last", b"junk", admission(store))
    assert ingest.due()


async def test_the_timer_releases_what_waits_and_a_release_disarms_it(store: Store, events: list) -> None:
    sent = asyncio.Event()
    ingest = make_ingest(store, events, asyncio.get_running_loop(), sent)
    await ingest.handle("a", update("a", "u1"), admission(store))
    await ingest.handle("b", update("b", "u2"), admission(store))
    assert events == []
    async with asyncio.timeout(5):
        await sent.wait()  # the timer fires RELEASE_AFTER after the first receipt was queued
    assert [kind for kind, _ in events] == ["sync", "send", "send"]

    await ingest.handle("c", update("c", "u3"), admission(store))
    assert ingest.release() == 1  # explicitly, before the timer
    async with asyncio.timeout(5):
        await ingest.drain()
    await ingest.handle("d", update("d", "u4"), admission(store))
    ingest.close()  # its owner stops: nothing fires afterwards
    await asyncio.sleep(3 * ingest_module.RELEASE_AFTER)  # a check that nothing happens needs the time to pass
    assert [kind for kind, _ in events].count("send") == 3 and ingest.unsent == 1


class GatedSyncs:
    """Store.sync_soon replaced by Futures the test completes itself, in any order it likes."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pending: list[concurrent.futures.Future[None]] = []
        monkeypatch.setattr(store, "sync_soon", self.sync_soon)

    def sync_soon(self) -> concurrent.futures.Future[None]:
        self.pending.append(concurrent.futures.Future())
        return self.pending[-1]


async def loop_turns(count: int = 4) -> None:
    """Let the loop run its ready callbacks (a completed sync reaches Ingest in two turns): checking that nothing
    happens needs them to have had their chance."""
    for _ in range(count):
        await asyncio.sleep(0)


def sent_ids(events: list[tuple[str, object]]) -> list[str]:
    return [receipt.update_id for kind, receipt in events if kind == "send"]  # type: ignore[attr-defined]


async def test_receipts_leave_after_their_background_sync_and_in_release_order(store: Store, events: list,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = GatedSyncs(store, monkeypatch)
    ingest = make_ingest(store, events, asyncio.get_running_loop())
    await ingest.handle("a", update("a", "u1"), admission(store))
    await ingest.handle("b", update("b", "u2"), admission(store))
    assert ingest.release() == 2
    await ingest.handle("c", update("c", "u3"), admission(store))  # the loop goes on while the first batch syncs
    await ingest.handle("a", update("a", "u1"), admission(store))  # a duplicate's receipt waits behind the acceptance it names
    assert ingest.release() == 2 and len(syncs.pending) == 2

    syncs.pending[1].set_result(None)  # the later batch is durable first (a thread never does this; order holds anyway)
    await loop_turns()
    assert sent_ids(events) == []
    syncs.pending[0].set_result(None)
    async with asyncio.timeout(5):
        await ingest.drain()
    assert sent_ids(events) == ["u1", "u2", "u3", "u1"]
    assert [r.status for kind, r in events if kind == "send"][-1] is ReceiptStatus.DUPLICATE  # type: ignore[attr-defined]


async def test_a_failed_sync_stops_every_receipt_and_the_ingest(store: Store, events: list, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = GatedSyncs(store, monkeypatch)
    ingest = make_ingest(store, events, asyncio.get_running_loop())
    await ingest.handle("a", update("a", "u1"), admission(store))
    ingest.release()
    await ingest.handle("b", update("b", "u2"), admission(store))
    ingest.release()
    syncs.pending[0].set_exception(OSError(5, "Input/output error"))
    syncs.pending[1].set_result(None)  # after a failed fsync a later one may "succeed": it proves nothing
    with pytest.raises(OSError, match="Input/output error"):
        async with asyncio.timeout(5):
            await ingest.drain()
    assert sent_ids(events) == []
    with pytest.raises(OSError):
        await ingest.handle("c", update("c", "u3"), admission(store))


async def test_closing_abandons_receipts_still_syncing(store: Store, events: list, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = GatedSyncs(store, monkeypatch)
    ingest = make_ingest(store, events, asyncio.get_running_loop())
    await ingest.handle("a", update("a", "u1"), admission(store))
    ingest.release()
    ingest.close()  # the connection is about to close: nothing may be published after it
    syncs.pending[0].set_result(None)
    await loop_turns()
    assert sent_ids(events) == [] and store.is_accepted("u1")  # spooled: its sender's resend gets "duplicate"


async def test_a_sync_that_cannot_even_start_stops_the_ingest_too(store: Store, events: list, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_descriptors() -> concurrent.futures.Future[None]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(store, "sync_soon", no_descriptors)
    ingest = make_ingest(store, events, asyncio.get_running_loop())
    await ingest.handle("a", update("a", "u1"), admission(store))
    assert ingest.release() == 0  # the timer calls this: it must not raise into the loop's exception handler
    with pytest.raises(OSError, match="Too many open files"):
        await ingest.handle("b", update("b", "u2"), admission(store))
    assert sent_ids(events) == []


async def test_a_receipt_the_store_cannot_record_stops_the_ingest_and_tells_its_owner(store: Store, events: list,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: with the disk full, recording a batch of receipts raised into the release timer, which only logged it,
    and the batch was lost; now it stops receipting for good, as a failed fsync does, and the owner is told."""
    def disk_full(rows: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    failures: list[BaseException] = []
    monkeypatch.setattr(store, "record_receipts", disk_full)
    ingest = make_ingest(store, events, asyncio.get_running_loop())
    ingest.on_failure = failures.append
    await ingest.handle("a", update("a", "u1"), admission(store))
    assert ingest.release() == 0  # the timer calls this: nothing may escape into the loop's exception handler
    assert [type(f) for f in failures] == [sqlite3.OperationalError]
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        await ingest.handle("b", update("b", "u2"), admission(store))
    with pytest.raises(sqlite3.OperationalError):
        async with asyncio.timeout(5):
            await ingest.drain()
    assert sent_ids(events) == []

"""The store of a running aggregator lives on its own thread: the event loop never waits on it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from aggregator.store import Store, StoreThread, call, run


async def test_every_call_runs_on_the_store_thread_and_the_store_is_closed_on_exit(tmp_path: Path) -> None:
    async with asyncio.timeout(30):
        async with StoreThread(tmp_path / "agg.sqlite") as db:
            assert (await run(db, lambda: threading.current_thread().name)).startswith("fedge-store")
            assert threading.current_thread().name != "fedge-store"
            assert await call(db, Store.open_round, 1, 0, None) is False  # the first opening of round 1
            assert await call(db, Store.open_round, 1, 0, None) is True  # opened again: an aggregator resuming it
        with pytest.raises(RuntimeError, match="not open"):
            db.store  # noqa: B018 - the property raises once the store is closed
        with Store(tmp_path / "agg.sqlite", readonly=True) as again:
            assert [r["round"] for r in again.rounds()] == [1]


async def test_a_store_locked_by_another_process_does_not_stall_the_loop(tmp_path: Path) -> None:
    """Another writer holds SQLite's lock: the admission waits on the store's thread while the loop goes on."""
    path = tmp_path / "agg.sqlite"
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(30)
        other.execute("ROLLBACK")
        other.close()

    async with asyncio.timeout(30), StoreThread(path) as db:
        await call(db, Store.open_round, 1, 0, None)
        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        try:
            await asyncio.to_thread(locked.wait, 30)
            admitting = asyncio.ensure_future(call(db, Store.admit, update_id="u1", client_id="a", round_no=1, base_version=0,
                                                   num_samples=1, payload=b"x", check=lambda standing: None))
            for _ in range(20):  # the loop runs other work while the admission waits for the lock
                await asyncio.sleep(0)
            assert not admitting.done()
        finally:
            release.set()
            await asyncio.to_thread(holder.join, 30)
        await admitting
        assert await call(db, Store.is_accepted, "u1")


async def test_a_cancelled_owner_still_closes_the_store(tmp_path: Path) -> None:
    entered = asyncio.Event()

    async def owner() -> None:
        async with StoreThread(tmp_path / "agg.sqlite") as db:
            await call(db, Store.open_round, 1, 0, None)
            entered.set()
            await asyncio.Event().wait()

    async with asyncio.timeout(30):
        task = asyncio.create_task(owner())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with Store(tmp_path / "agg.sqlite") as store:  # closed cleanly: writable again, its round recorded
        assert store.open_round(1, 0, None) is True

"""Who runs the store's calls: its own thread in a running aggregator, the caller's in tests and tools.

A ``Store`` is synchronous: a call may fsync, wait for another process's SQLite transaction
(``BUSY_TIMEOUT``), or read or write a whole model (closing a round with a 100 MB model took
1.43 s). On an event loop, any of those would stall the broker's keepalives, the receipts and the
dashboard. So a running aggregator (and each ingest worker) opens its Store on a thread of its
own, ``StoreThread``, and runs every call there, one at a time, in the order asked: ``await
db.call(Store.spooled, round_no)``, or ``db.submit(...)`` for a Future the caller chains without
awaiting (the ingest's group commit). The loop goes on serving its connection meanwhile; a hop
costs ~30 us here, twice per update (precheck and admit).

``InlineStore`` has the same interface and runs each call at once, in the caller's thread: for
tests and tools that hold a Store of their own.

The Store is created on its thread and used only there, so sqlite3's same-thread check holds.
A function passed to ``submit``/``run`` runs on that thread: it must not touch the loop's state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Concatenate, ParamSpec, Protocol, Self, TypeVar

from aggregator.store.store import Store

P = ParamSpec("P")
R = TypeVar("R")


class StoreAccess(Protocol):
    """A Store and the thread its calls run on."""

    @property
    def store(self) -> Store: ...

    def submit(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        """Start ``function`` (which uses the store) on the store's thread; its Future."""
        ...


def run(access: StoreAccess, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
    """``function(*args, **kwargs)`` on ``access``'s thread, awaited from the loop."""
    return asyncio.wrap_future(access.submit(function, *args, **kwargs))


def call(access: StoreAccess, method: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
    """``method(store, *args, **kwargs)`` on ``access``'s thread, awaited from the loop."""
    return asyncio.wrap_future(access.submit(method, access.store, *args, **kwargs))


class InlineStore:
    """A Store whose calls run at once, in the caller's thread (tests, tools)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        try:
            future.set_result(function(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


class StoreThread:
    """``async with StoreThread(path) as db``: the Store at ``path``, opened, used and closed on one thread."""

    def __init__(self, path: Path | str, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._store: Store | None = None

    async def __aenter__(self) -> Self:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedge-store")
        try:
            self._store = await asyncio.wrap_future(self._executor.submit(Store, self.path, fsync=self.fsync))
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the store on its thread (a clean shutdown syncs what is deferred), even when cancelled."""
        executor, store = self._executor, self._store
        self._store = None
        if executor is None:
            return
        try:
            if store is not None:
                await asyncio.shield(asyncio.wrap_future(executor.submit(store.close)))
        finally:
            executor.shutdown(wait=True)  # nothing is queued any more: returns at once unless the close was cut short
            self._executor = None

    @property
    def store(self) -> Store:
        """The Store itself: call its methods through ``submit``/``call``; read plain attributes (its path) anywhere."""
        if self._store is None:
            raise RuntimeError(f"the store {self.path} is not open")
        return self._store

    def submit(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        if self._executor is None or self._store is None:
            raise RuntimeError(f"the store {self.path} is not open")
        return self._executor.submit(function, *args, **kwargs)

"""Small asyncio helpers both programs need: racing two awaitables, clean shutdown, metered work on a thread.

``race(first, second)`` is "wait for whichever comes first, cancel the other": a publish against
the connection dropping, a queue against a control channel, a main task against a signal. Written
by hand with ``asyncio.wait(..., FIRST_COMPLETED)`` it is easy to leave the loser running, to lose
the loser's result when both finished in the same step, or to leak both tasks when the caller is
cancelled; ``race`` does each of these once, right.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")
R = TypeVar("R")

__all__ = ["First", "Second", "ThreadMeter", "cancel_and_wait", "race"]


@dataclass(frozen=True, slots=True)
class First(Generic[T]):
    """``race``'s first awaitable won (it also wins a tie: both finished in the same step)."""

    value: T


@dataclass(frozen=True, slots=True)
class Second(Generic[U]):
    """``race``'s second awaitable won."""

    value: U


async def race(
    first: Awaitable[T],
    second: Awaitable[U],
    *,
    spare: Callable[[First[T] | Second[U]], object] | None = None,
) -> First[T] | Second[U]:
    """Await both, return the winner's result wrapped (``First``/``Second``) or raise its exception.

    The loser is cancelled and awaited before this returns, so nothing is left running. The first
    awaitable has priority when both finished in the same step. A loser that finished anyway (in the
    same step, or while being cancelled) hands its result to ``spare`` if given; without ``spare`` it
    is dropped. No error is dropped: if the winner succeeded and the loser raised (other than the
    cancellation), that error is raised. A Future or Task passed in is cancelled if it loses: pass
    ``asyncio.shield(future)`` to keep one that is not yours.

    If the caller is cancelled meanwhile, both are cancelled and awaited, then CancelledError is
    raised (results that arrived in that window are dropped).
    """
    a: asyncio.Future[T] = asyncio.ensure_future(first)
    b: asyncio.Future[U] = asyncio.ensure_future(second)
    try:
        await asyncio.wait((a, b), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await cancel_and_wait((a, b))
        _retrieve(a)
        _retrieve(b)
        raise
    a_won = a.done()
    try:
        await cancel_and_wait([b if a_won else a])
    except BaseException:
        _retrieve(a)
        _retrieve(b)
        raise
    winner: First[T] | Second[U]
    if a_won:
        _retrieve(b)
        winner = First(a.result())  # raises the winner's error
        lost = _outcome(b, Second)
    else:
        _retrieve(a)
        winner = Second(b.result())
        lost = _outcome(a, First)
    if lost is not None and spare is not None:
        spare(lost)
    return winner


def _retrieve(future: asyncio.Future[Any]) -> BaseException | None:
    """The future's error, marked as retrieved (asyncio logs an error nobody looked at)."""
    if future.done() and not future.cancelled():
        return future.exception()
    return None


def _outcome(loser: asyncio.Future[Any], wrap: Callable[[Any], Any]) -> Any:
    """The loser's result, wrapped; None if it was cancelled; its error raised (never dropped)."""
    if loser.cancelled():
        return None
    error = loser.exception()
    if error is not None:
        raise error
    return wrap(loser.result())


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, recancel_after: float = 0.5) -> None:
    """Cancel ``tasks`` and return once all are done, cancelling again any that ignored it.

    Python 3.11's ``asyncio.wait_for`` (which aiomqtt uses for every publish and subscribe) can
    swallow a cancellation that arrives just as the awaited future completes (CPython gh-86296,
    fixed in 3.12). A single ``cancel()`` can then be lost and a task group would wait forever,
    for instance an agent asked to stop while its PUBACK is arriving.

    Cleanup survives cancellation: if the caller is cancelled meanwhile (a shutdown that cancels
    again, a timeout), it still waits until every task is done, then raises CancelledError. Leaving
    early would leave the tasks running unowned.
    """
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    interrupted = False
    while pending:
        try:
            _, still = await asyncio.wait(pending, timeout=recancel_after)
        except asyncio.CancelledError:
            interrupted = True  # go on waiting: cancelling them again now would cut their cleanup short
            pending = {t for t in pending if not t.done()}
            continue
        for task in still:
            task.cancel()
        pending = still
    if interrupted:
        raise asyncio.CancelledError


class ThreadMeter:
    """Runs CPU-bound calls (secure aggregation's crypto) on a worker thread, so the event loop keeps
    serving the connection, and adds up their CPU time (``time.thread_time``) in ``seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    async def run(self, function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        def timed() -> R:
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
        return await asyncio.to_thread(timed)

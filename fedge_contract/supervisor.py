"""Background tasks owned by one ``async with``: what a long-lived resource (a Connection) runs.

Like ``asyncio.TaskGroup``, with the differences such a resource needs:

- leaving cancels the tasks instead of waiting for them: they serve the body, they never finish;
- the first error of a task is the resource's failure: the other tasks are cancelled, the body is
  interrupted (its task cancelled, as a TaskGroup does), ``failed`` is set so that callers waiting
  in other tasks can give up, and leaving raises the error itself, not an ExceptionGroup;
- cleanup survives cancellation: a body cancelled again while its tasks unwind still waits for
  them (``cancel_and_wait``), so nothing is left running unowned.

The task that enters must be the one that leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from fedge_contract.aio import cancel_and_wait

T = TypeVar("T")
REINTERRUPT = 0.5  # seconds between interruptions of a body that swallowed one


class Supervisor:
    def __init__(self, name: str, *, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.name = name
        self._on_failure = on_failure  # told first, before any task is cancelled
        self.failed = asyncio.Event()  # set with the first error of a task
        self._failure: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._owner: asyncio.Task[Any] | None = None
        self._interrupts = 0  # times we cancelled the owner: leaving uncancels as many
        self._reinterrupt: asyncio.TimerHandle | None = None
        self._exiting = False
        self._closed = False

    @property
    def failure(self) -> BaseException | None:
        """The error that failed the supervisor, if any."""
        return self._failure

    async def __aenter__(self) -> Self:
        if self._owner is not None:
            raise RuntimeError(f"{self.name}: a supervisor is entered once")
        self._owner = asyncio.current_task()
        return self

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Run ``coro`` beside the body until it ends or the supervisor is left."""
        if self._owner is None or self._closed or self._failure is not None:
            coro.close()
            raise RuntimeError(f"{self.name}: cannot start {name!r}, the supervisor is not running")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())  # type: ignore[arg-type]

    def fail(self, error: BaseException) -> None:
        """Fail with ``error`` (the first one counts): cancel every task, interrupt the body."""
        if self._failure is not None:
            return
        self._failure = error
        self.failed.set()
        if self._on_failure is not None:
            self._on_failure(error)
        for task in self._tasks:
            task.cancel()
        self._interrupt()

    def _interrupt(self) -> None:
        """Cancel the owner's body, and again every ``REINTERRUPT`` s until it leaves: Python 3.11's
        ``asyncio.wait_for`` (aiomqtt's publish) can swallow a cancellation (CPython gh-86296)."""
        owner = self._owner
        if owner is None or self._exiting or owner.done():
            return
        self._interrupts += 1
        owner.cancel()
        self._reinterrupt = asyncio.get_running_loop().call_later(REINTERRUPT, self._interrupt)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._exiting = True
        if self._reinterrupt is not None:
            self._reinterrupt.cancel()
        cancelled_meanwhile = False
        try:
            await cancel_and_wait(list(self._tasks))
        except asyncio.CancelledError:
            cancelled_meanwhile = True  # cancelled again while cleaning up: the cleanup finished all the same
        self._closed = True
        if self._reinterrupt is not None:
            self._reinterrupt.cancel()
        assert self._owner is not None
        for _ in range(self._interrupts):
            self._owner.uncancel()
        self._interrupts = 0
        if self._failure is not None and not (exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit))):
            raise self._failure  # the body's own exception, if any, is its __context__
        if cancelled_meanwhile:
            raise asyncio.CancelledError

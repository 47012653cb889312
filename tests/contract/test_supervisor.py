"""fedge_contract.supervisor: a task's error interrupts the owner's body and is raised by its
``async with``; leaving cancels the tasks; cleanup finishes even when the owner is cancelled again."""

from __future__ import annotations

import asyncio

import pytest

from fedge_contract.supervisor import Supervisor


def others(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - before - {asyncio.current_task()}  # type: ignore[operator]


async def test_a_failing_task_interrupts_the_body_and_the_async_with_raises_its_error():
    async with asyncio.timeout(5):
        before = asyncio.all_tasks()
        go, reached = asyncio.Event(), []

        async def fails() -> None:
            await go.wait()
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            async with Supervisor("t") as supervisor:
                supervisor.spawn(fails(), name="fails")
                supervisor.spawn(asyncio.Event().wait(), name="bystander")
                go.set()
                await asyncio.Event().wait()  # interrupted, as a TaskGroup interrupts its body
                reached.append("after")
        assert not reached and supervisor.failed.is_set()
        assert not others(before)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_leaving_cancels_the_tasks_and_the_body_result_stands():
    async with asyncio.timeout(5):
        before = asyncio.all_tasks()
        cancelled = asyncio.Event()

        async def serves() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async with Supervisor("t") as supervisor:
            supervisor.spawn(serves(), name="serves")
            await asyncio.sleep(0)
        assert cancelled.is_set() and supervisor.failure is None and not others(before)
        with pytest.raises(RuntimeError, match="not running"):
            supervisor.spawn(serves(), name="late")


async def test_the_bodys_own_error_propagates_when_nothing_failed():
    async with asyncio.timeout(5):
        with pytest.raises(KeyError):
            async with Supervisor("t") as supervisor:
                supervisor.spawn(asyncio.Event().wait(), name="serves")
                raise KeyError("body")


async def test_an_error_raised_while_tasks_are_cancelled_at_exit_is_not_lost():
    async with asyncio.timeout(5):
        async def breaks_on_cancel() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise ValueError("cleanup bug") from None

        with pytest.raises(ValueError, match="cleanup bug"):
            async with Supervisor("t") as supervisor:
                supervisor.spawn(breaks_on_cancel(), name="t")
                await asyncio.sleep(0)


async def test_an_owner_cancelled_again_during_cleanup_waits_for_it_then_is_cancelled():
    async with asyncio.timeout(5):
        before = asyncio.all_tasks()
        cleaning, finish = asyncio.Event(), asyncio.Event()

        async def slow_cleanup() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cleaning.set()
                await finish.wait()

        async def owner() -> None:
            async with Supervisor("t") as supervisor:
                supervisor.spawn(slow_cleanup(), name="slow")
                await asyncio.Event().wait()

        task = asyncio.create_task(owner())
        await asyncio.sleep(0)
        task.cancel()
        await cleaning.wait()
        task.cancel()  # a shutdown that cancels again (fedge's CLI does, every 0.5 s)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not others(before)

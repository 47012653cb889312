"""fedge_contract.aio: race() returns the winner, cancels and awaits the loser, keeps a result that
would otherwise be lost, never drops an error, and leaves nothing running when its caller is
cancelled; cancel_and_wait finishes its cleanup even when cancelled itself."""

from __future__ import annotations

import asyncio

import pytest

from fedge_contract.aio import First, Second, cancel_and_wait, race


class Watched:
    """An awaitable side of a race that records how it ended."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = False
        self.value: object = None

    async def wait(self, value: object = None, *, error: BaseException | None = None) -> object:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if error is not None:
            raise error
        return value


def others() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def test_the_first_to_finish_wins_and_the_loser_is_cancelled_and_awaited():
    async with asyncio.timeout(5):
        fast, slow = Watched(), Watched()
        fast.release.set()
        assert await race(fast.wait("a"), slow.wait("b")) == First("a")
        assert slow.cancelled and not others()

        fast, slow = Watched(), Watched()
        fast.release.set()
        assert await race(slow.wait("a"), fast.wait("b")) == Second("b")
        assert slow.cancelled and not others()


async def test_the_winners_error_is_raised_and_the_loser_still_cancelled():
    async with asyncio.timeout(5):
        failing, slow = Watched(), Watched()
        failing.release.set()
        with pytest.raises(ValueError, match="boom"):
            await race(slow.wait(), failing.wait(error=ValueError("boom")))
        assert slow.cancelled and not others()


async def test_a_tie_goes_to_the_first_and_spare_keeps_the_seconds_result():
    async with asyncio.timeout(5):
        loop = asyncio.get_running_loop()
        a, b = loop.create_future(), loop.create_future()
        a.set_result("control")
        b.set_result("message")
        kept: list[object] = []
        assert await race(a, b, spare=kept.append) == First("control")
        assert kept == [Second("message")]

        c, d = loop.create_future(), loop.create_future()
        c.set_result(1)
        d.set_result(2)
        assert await race(c, d) == First(1)  # without spare the tied result is dropped


async def test_a_loser_that_finishes_while_being_cancelled_hands_its_result_to_spare():
    async with asyncio.timeout(5):
        async def swallows_cancellation() -> str:  # what CPython gh-86296 does to wait_for in 3.11
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass
            return "late"

        winner = Watched()
        winner.release.set()
        kept: list[object] = []
        assert await race(winner.wait("won"), swallows_cancellation(), spare=kept.append) == First("won")
        assert kept == [Second("late")]


async def test_an_error_the_loser_raises_while_being_cancelled_is_not_dropped():
    async with asyncio.timeout(5):
        async def breaks_on_cancel() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed") from None

        winner = Watched()
        winner.release.set()
        with pytest.raises(RuntimeError, match="cleanup failed"):
            await race(winner.wait(), breaks_on_cancel())
        assert not others()


async def test_cancelling_the_caller_cancels_and_awaits_both_sides():
    async with asyncio.timeout(5):
        left, right = Watched(), Watched()
        racing = asyncio.create_task(race(left.wait(), right.wait()))
        await left.started.wait()
        await right.started.wait()
        racing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await racing
        assert left.cancelled and right.cancelled and not others()


async def test_a_future_that_is_not_yours_survives_losing_when_shielded():
    async with asyncio.timeout(5):
        theirs: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        winner = Watched()
        winner.release.set()
        assert await race(winner.wait("w"), asyncio.shield(theirs)) == First("w")
        assert not theirs.done()
        unshielded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await race(winner.wait("w"), unshielded)
        assert unshielded.cancelled()


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_the_first_cancellation():
    async with asyncio.timeout(5):
        swallowed = asyncio.Event()

        async def stubborn() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed.set()
            await asyncio.Event().wait()  # only a second cancel() ends it

        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await cancel_and_wait([task], recancel_after=0.01)
        assert swallowed.is_set() and task.cancelled()


async def test_cancel_and_wait_finishes_its_cleanup_when_its_caller_is_cancelled():
    async with asyncio.timeout(5):
        cleaning, finish = asyncio.Event(), asyncio.Event()

        async def slow_cleanup() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cleaning.set()
                await finish.wait()  # a cleanup that takes a while (a DISCONNECT to send, say)

        worker = asyncio.create_task(slow_cleanup())
        await asyncio.sleep(0)
        closer = asyncio.create_task(cancel_and_wait([worker]))
        await cleaning.wait()
        closer.cancel()  # a shutdown that cancels again while the cleanup runs
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closer.done() and not worker.done()
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await closer
        assert worker.done() and not others()

"""The loop-stall monitor sees a callback that holds the event loop."""

from __future__ import annotations

import asyncio
import time

from fedge_runtime.loop_stall import LoopStallMonitor


async def test_a_blocking_call_on_the_loop_is_seen_and_reset_starts_over() -> None:
    async with asyncio.timeout(30), LoopStallMonitor(interval=0.005) as stall:
        await stall.ticked.wait()  # the ticker runs: its next wake-up is asked for
        stall.ticked.clear()
        time.sleep(0.3)  # noqa: ASYNC251 - the stall under test: it blocks the loop on purpose
        await stall.ticked.wait()  # the ticker wakes, late
        assert stall.longest >= 0.25 and stall.stalls >= 1
        assert stall.reset() >= 0.25
        assert stall.longest == 0.0


async def test_leaving_stops_the_ticker() -> None:
    async with asyncio.timeout(30):
        monitor = LoopStallMonitor()
        async with monitor:
            pass
        assert monitor._task is None
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "loop-stall-monitor"]

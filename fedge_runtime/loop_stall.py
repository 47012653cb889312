"""How long the event loop was kept from running: the measure of "nothing blocks the loop".

A program's event loop serves its MQTT connection: keepalives, PUBACKs, receipts. A callback
that runs for a second (a checkpoint written on the loop, a query that waits for a lock) stalls
all of them. ``LoopStallMonitor`` runs a ticker that asks to wake every ``interval`` seconds and
records how late each wake-up is: the lateness is the longest time anything held the loop, give
or take one interval. It costs one wake-up per interval (1 ms here: ~1% of one core).

Used by the aggregator (its Prometheus gauge ``fedge_event_loop_longest_stall_seconds``) and by
bench/loop_stall.py, which asserts nothing and prints the figures.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Self

from fedge_contract.aio import cancel_and_wait


class LoopStallMonitor:
    """``async with LoopStallMonitor() as stall``: ``stall.longest`` is the longest stall seen, in seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.longest = 0.0  # seconds: the largest lateness of a wake-up
        self.stalls = 0  # wake-ups later than 50 ms
        self.ticked = asyncio.Event()  # set at every wake-up (a test waits on it instead of sleeping)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._tick(), name="loop-stall-monitor")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    def reset(self) -> float:
        """The longest stall since the last reset (or the start); starts a new measurement."""
        longest, self.longest = self.longest, 0.0
        return longest

    async def _tick(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.interval)
            late = time.perf_counter() - asked - self.interval
            if late > self.longest:
                self.longest = late
            if late > 0.05:
                self.stalls += 1
            self.ticked.set()

"""Running a command's main coroutine until it ends or the process is told to stop.

Every long-running ``fedge`` command (the broker, the aggregator, an agent, the live view) runs
through ``run_until_stopped``; it lives apart from the CLI so the modules a command dispatches to
can use it without importing the CLI back.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from fedge_contract.aio import Second, race


def run_until_stopped(coro: Coroutine[Any, Any, int | None]) -> int:
    """Run until done or SIGTERM/SIGINT, which cancel the main task so every context manager unwinds.

    Returns the coroutine's exit code (None counts as 0), or 130 when a signal stopped it.
    """

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        won = await race(asyncio.create_task(coro, name="main"), stop.wait())
        if isinstance(won, Second):  # a signal: main was cancelled and has unwound
            return 130
        return won.value or 0

    return asyncio.run(runner())

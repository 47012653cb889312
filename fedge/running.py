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

from fedge_contract.aio import cancel_and_wait


def run_until_stopped(coro: Coroutine[Any, Any, int | None]) -> int:
    """Run until done or SIGTERM/SIGINT, which cancel the main task so every context manager unwinds.

    Returns the coroutine's exit code (None counts as 0), or 130 when a signal stopped it.
    """

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        main_task = asyncio.create_task(coro, name="main")
        stopper = asyncio.create_task(stop.wait(), name="signals")
        await asyncio.wait({main_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not main_task.done():
            await cancel_and_wait([main_task])
            return 130
        await cancel_and_wait([stopper])
        return main_task.result() or 0

    return asyncio.run(runner())

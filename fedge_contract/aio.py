"""Small asyncio helpers both programs need for clean shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], *, recancel_after: float = 0.5) -> None:
    """Cancel ``tasks`` and return once all are done, cancelling again any that ignored it.

    Python 3.11's ``asyncio.wait_for`` (which aiomqtt uses for every publish and subscribe) can
    swallow a cancellation that arrives just as the awaited future completes (CPython gh-86296,
    fixed in 3.12). A single ``cancel()`` can then be lost and a task group would wait forever,
    for instance an agent asked to stop while its PUBACK is arriving.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_after)

"""The real faults of ``fedge simulate``, done to its real processes: the aggregator SIGKILLed,
Mosquitto SIGKILLed, both within a second (issue 19's double fault), and the store's disk filled.

Each restarts what it broke the way production would (systemd restarts the aggregator, the
broker comes back), so the run must finish its rounds anyway; what happened goes to chaos.json.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from broker import LocalBroker
from fedge.failures import EXIT_STORAGE
from fedge.simulate import disk_full

log = logging.getLogger("fedge.simulate")

STORE_FULL_EXIT_TIMEOUT = 120.0  # seconds the aggregator has to notice its full disk and exit (it writes on every update)
STORE_FULL_HOLD = 2.0  # seconds the disk stays full after the aggregator exited, before the space is freed


class Children(Protocol):
    """What the faults need of the run's children (fedge/simulate/runner.py's _Children)."""

    processes: dict[str, asyncio.subprocess.Process]
    killed: set[str]

    async def spawn(self, name: str, *args: str) -> asyncio.subprocess.Process: ...


class ProcessFaults:
    """Kills and restarts the run's aggregator and broker; ``seed`` draws the double fault's timings."""

    def __init__(self, children: Children, broker: LocalBroker, aggregator_args: tuple[str, ...], store: Path, seed: int,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.children = children
        self.broker = broker
        self.aggregator_args = aggregator_args
        self.store = store
        self.rng = random.Random(f"process-faults:{seed}")
        self.sleep = sleep
        self._restarts = itertools.count(2)

    def _aggregator(self) -> str:
        """The name of the aggregator running now (the newest one started)."""
        return next((n for n in reversed(self.children.processes) if n.startswith("aggregator")), "aggregator")

    async def _kill_aggregator(self) -> None:
        name = self._aggregator()
        self.children.killed.add(name)  # its exit is on purpose, not the run's failure
        self.children.processes[name].kill()
        await self.children.processes[name].wait()

    async def _start_aggregator(self) -> None:
        await self.children.spawn(f"aggregator-{next(self._restarts)}", *self.aggregator_args)

    async def restart_aggregator(self) -> None:
        """SIGKILL the aggregator mid-round; start it again at once."""
        await self._kill_aggregator()
        await self._start_aggregator()

    async def restart_broker(self) -> None:
        """SIGKILL Mosquitto mid-round (it loses what it had not autosaved); start it again at once."""
        await self.broker.kill()
        await self.broker.start()

    async def double_fault(self) -> dict[str, object]:
        """The aggregator SIGKILLed, Mosquitto SIGKILLed 0.2-1 s later and restarted 2-3 s after that.

        The aggregator restarts as soon as the broker is gone, so it starts against a broker that
        is down and comes back, while the devices return on their own reconnect schedule. The run
        that found issue 19's first loss: aggregator, then broker 0.5 s later, down 2.5 s.
        """
        gap, down = round(self.rng.uniform(0.2, 1.0), 2), round(self.rng.uniform(2.0, 3.0), 2)
        await self._kill_aggregator()
        await self.sleep(gap)
        await self.broker.kill()
        await self._start_aggregator()
        await self.sleep(down)
        await self.broker.start()
        return {"broker_killed_after_s": gap, "broker_down_s": down}

    async def fill_store(self) -> dict[str, object]:
        """Fill the store's disk; the aggregator must exit with EXIT_STORAGE and one line saying so.

        Then the disk stays full STORE_FULL_HOLD s, the space is freed and the aggregator started
        again (its systemd unit restarts it), to resume from the store. An aggregator that does
        not exit in STORE_FULL_EXIT_TIMEOUT s is SIGKILLed (recorded: the fault's check fails).
        """
        name = self._aggregator()
        process = self.children.processes[name]
        self.children.killed.add(name)  # its exit is this fault's to check, not the run watcher's
        started = time.monotonic()
        filler, filled = await asyncio.to_thread(disk_full.fill, self.store.parent)
        try:
            try:
                async with asyncio.timeout(STORE_FULL_EXIT_TIMEOUT):
                    code = await process.wait()
                exited = True
            except TimeoutError:
                process.kill()
                code, exited = await process.wait(), False
            seconds = round(time.monotonic() - started, 2)
            stderr = (await process.stderr.read()).decode(errors="replace") if process.stderr else ""
            lines = stderr.strip().splitlines()
            if not exited or code != EXIT_STORAGE or len(lines) != 1:
                log.error("chaos: the aggregator on a full store ended with %s after %.1f s, not exit code %d and one line: %s",
                          code if exited else "no exit (killed)", seconds, EXIT_STORAGE, stderr.strip()[-2000:])
            await self.sleep(STORE_FULL_HOLD)
        finally:
            await asyncio.to_thread(disk_full.free, filler)
        await self._start_aggregator()
        return {"filled_bytes": filled, "exited": exited, "exit_code": code, "seconds_to_exit": seconds, "stderr": lines[-5:]}

"""The coordinator's ingest worker processes: start, talk to, restart and stop them.

``WorkerPool`` is an async context manager: entering starts N ``python -m aggregator.workers.process``
children, each with its setup frame on stdin; leaving asks them to stop, then kills whatever is
still running and waits for it, however the block exits (cancellation included). Every frame a
worker writes, and its exit, arrive as ``WorkerEvent``s on one queue that the coordinator's round
loop reads, so all round state stays in that one task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedge_contract.aio import cancel_and_wait
from fedge_contract.frames import pack_frame, read_frame

log = logging.getLogger("fedge.aggregator")


@dataclass(frozen=True)
class WorkerEvent:
    index: int
    frame: dict[str, Any] | None  # None: the worker exited
    returncode: int | None = None


def _child_env() -> dict[str, str]:
    """The worker imports the same ``aggregator`` package as this process, installed or not."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


class WorkerPool:
    def __init__(self, count: int, setup: Callable[[int], dict[str, Any]], events: asyncio.Queue[Any], *, stop_timeout: float = 10.0) -> None:
        self.count = count
        self.setup = setup
        self.events = events
        self.stop_timeout = stop_timeout
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # pipe readers and pending respawns

    async def __aenter__(self) -> Self:
        try:
            for index in range(self.count):
                await self._spawn(index)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        respawns = [t for t in self._tasks if t.get_name().startswith("respawn")]
        await cancel_and_wait(respawns)
        procs = list(self._procs.values())
        for index in list(self._procs):
            self.send(index, {"kind": "stop"})
            stdin = self._procs[index].stdin
            if stdin is not None and not stdin.is_closing():
                stdin.close()
        try:
            async with asyncio.timeout(self.stop_timeout):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.warning("ingest workers did not stop within %.0fs: killing them", self.stop_timeout)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
            await asyncio.shield(asyncio.gather(*(p.wait() for p in procs)))
            await cancel_and_wait(list(self._tasks))

    @property
    def pids(self) -> dict[int, int]:
        """Worker index -> pid of the running process."""
        return {i: p.pid for i, p in self._procs.items() if p.returncode is None}

    def send(self, index: int, frame: dict[str, Any]) -> bool:
        """Write a control frame to worker ``index``; False if it is not running."""
        proc = self._procs.get(index)
        if proc is None or proc.returncode is not None or proc.stdin is None or proc.stdin.is_closing():
            return False
        try:
            proc.stdin.write(pack_frame(frame))
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def kill(self, index: int) -> None:
        proc = self._procs.get(index)
        if proc is not None and proc.returncode is None:
            proc.kill()

    def respawn(self, index: int, delay: float) -> None:
        """Start worker ``index`` again after ``delay`` seconds (its exit was handled)."""

        async def later() -> None:
            await asyncio.sleep(delay)
            await self._spawn(index)

        self._own(asyncio.create_task(later(), name=f"respawn-w{index}"))

    async def _spawn(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aggregator.workers.process", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_child_env(),
        )
        self._procs[index] = proc
        log.info("ingest worker %d started (pid %d)", index, proc.pid)
        self.send(index, self.setup(index))
        self._own(asyncio.create_task(self._read(index, proc), name=f"reader-w{index}"))

    def _own(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while (frame := await read_frame(proc.stdout)) is not None:
            self.events.put_nowait(WorkerEvent(index, frame))
        code = await proc.wait()
        self.events.put_nowait(WorkerEvent(index, None, code))

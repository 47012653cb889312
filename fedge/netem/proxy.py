"""FaultProxy: the async context manager that owns a set of faulty links and their schedule.

    async with FaultProxy(seed=1) as proxy:
        link = await proxy.add_link("agent-0", upstream=("127.0.0.1", broker_port), profile=PROFILES["flaky"])
        agent = AgentConfig(broker=BrokerAddress.parse(link.url), ...)
        proxy.schedule(parse_schedule("agent-0@r3+20"))
        ...
        proxy.notify_round(3)   # round-triggered faults fire here

Loopback only (it is a test tool, never a relay); every random choice comes from an RNG seeded
with (seed, link name); leaving the context, or ``lifetime`` seconds after entering it, closes
every link and connection, so nothing outlives its owner.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any, Self

from fedge.netem.link import Link
from fedge.netem.profiles import LinkProfile
from fedge.netem.schedule import Fault

log = logging.getLogger("fedge.netem")


def _check_loopback(host: str, what: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"FaultProxy {what} must be a loopback address, got {host!r}")


class FaultProxy:
    def __init__(self, *, seed: int = 0, host: str = "127.0.0.1", lifetime: float = 6 * 3600.0) -> None:
        _check_loopback(host, "listen host")
        self.seed = seed
        self.host = host
        self.lifetime = lifetime
        self.links: dict[str, Link] = {}
        self._faults: list[Fault] = []
        self._fired: set[int] = set()
        self._round = 0
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._spawn(self._expire(), name="netem:lifetime")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
        for task in list(self._tasks):
            task.cancel()
        assert self._group is not None
        await self._group.__aexit__(None, None, None)

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        if self._group is None or self._closed.is_set():
            coro.close()
            raise RuntimeError("FaultProxy is not running: use it as `async with FaultProxy() as proxy`")
        task = self._group.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _expire(self) -> None:
        await asyncio.sleep(self.lifetime)
        log.warning("FaultProxy lifetime of %gs is over: closing every link", self.lifetime)
        await self.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Close every link and connection (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        await asyncio.gather(*(link.close() for link in self.links.values()))

    # ------------------------------------------------------------------ links
    async def add_link(self, name: str, upstream: tuple[str, int], profile: LinkProfile | None = None, *, port: int = 0) -> Link:
        """Listen on a loopback port (``port``, or a free one) forwarding to ``upstream``."""
        if name in self.links:
            raise ValueError(f"link {name!r} exists already")
        _check_loopback(upstream[0], "upstream host")
        link = Link(name, upstream, profile or LinkProfile(), random.Random(f"{self.seed}:{name}"), self._spawn, self.host)
        await link.start(port)
        self.links[name] = link
        return link

    def link(self, name: str) -> Link:
        try:
            return self.links[name]
        except KeyError:
            raise ValueError(f"no link named {name!r} (links: {', '.join(self.links) or 'none'})") from None

    def heal_all(self) -> None:
        for link in self.links.values():
            link.heal()

    # ------------------------------------------------------------------ schedule
    def schedule(self, faults: Iterable[Fault]) -> None:
        """Add faults: time-triggered ones start their timer now, round-triggered ones wait for ``notify_round``."""
        for fault in faults:
            self.link(fault.link)  # fail now on an unknown link
            self._faults.append(fault)
            if fault.at_time is not None:
                self._spawn(self._fire_at(len(self._faults) - 1), name=f"netem:fault:{fault}")
            elif fault.at_round is not None and fault.at_round <= self._round:
                self._fire(len(self._faults) - 1)

    def notify_round(self, round_no: int) -> None:
        """Round ``round_no`` has opened: fire the faults scheduled for it (each once)."""
        self._round = max(self._round, round_no)
        for index, fault in enumerate(self._faults):
            if fault.at_round is not None and fault.at_round <= round_no:
                self._fire(index)

    async def _fire_at(self, index: int) -> None:
        await asyncio.sleep(self._faults[index].at_time or 0.0)
        self._fire(index)

    def _fire(self, index: int) -> None:
        if index in self._fired or self._closed.is_set():
            return
        self._fired.add(index)
        fault = self._faults[index]
        link = self.link(fault.link)
        log.info("fault %s fires", fault)
        if fault.on_upload:
            link.cut_at_next_upload(fault.seconds, reset_after=fault.reset_after, deliver=fault.deliver_upload)
        else:
            link.cut(fault.seconds, reset_after=fault.reset_after)

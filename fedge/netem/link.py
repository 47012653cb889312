"""One proxied link: a loopback listening port whose connections are forwarded to one upstream.

Each accepted connection gets its own upstream connection and two pumps (client to upstream,
upstream to client). A pump reads a chunk, decides its fate with the link's seeded RNG (a reset
loses it and the connection), stamps it with its delivery time (latency + jitter, never earlier
than the chunk before it: TCP does not reorder), and a writer delivers it once due, at the
bandwidth cap, unless the link is cut (black hole: nothing moves until it heals). Queues are
bounded, so a slow or cut link pushes back on its sender as a real one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from fedge.netem.profiles import LinkProfile

log = logging.getLogger("fedge.netem")

CHUNK = 64 * 1024
QUEUE_CHUNKS = 32  # per direction: at most 2 MiB buffered per connection
MAX_CONNECTIONS = 256  # per link; more are refused (a runaway reconnect loop must not eat the machine)
UPSTREAM_CONNECT_TIMEOUT = 10.0
UPLOAD_BYTES = 4096  # an upstream chunk this large counts as "an upload" (control messages are far smaller) ...
UPLOAD_MARKER = b"/updates/"  # ... as does one carrying these bytes (fedge's update topic, in the MQTT PUBLISH header)


class _Reset(Exception):
    """The link decided to drop this connection (a random reset or the end of a cut)."""


@dataclass
class LinkStats:
    connections: int = 0  # accepted so far
    open: int = 0  # open now
    refused: int = 0
    bytes_up: int = 0  # delivered client -> upstream
    bytes_down: int = 0  # delivered upstream -> client
    chunks: int = 0  # chunks delivered, both ways (a chunk is one read: one or a few MQTT packets)
    resets: int = 0  # connections reset at random (reset_prob)
    cut_resets: int = 0  # connections reset by a cut (when it healed, or at once with reset_now)
    cuts: int = 0


class Link:
    """A named link; create it with ``FaultProxy.add_link`` (which owns its tasks)."""

    def __init__(
        self, name: str, upstream: tuple[str, int], profile: LinkProfile, rng: random.Random,
        spawn: Callable[..., asyncio.Task[None]], host: str,
    ) -> None:
        self.name = name
        self.upstream = upstream
        self.profile = profile
        self.host = host
        self.port = 0
        self.stats = LinkStats()
        self._rng = rng
        self._spawn = spawn
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cut_until = 0.0
        self._reset_after_cut = True
        self._upload_cut: tuple[float, bool, bool] | None = None  # armed upload cut: (seconds, reset_after, deliver)
        self._ack_cut: tuple[float, bool] | None = None  # an upload went through: cut at its acknowledgement
        self._waiters: list[tuple[Callable[[LinkStats], bool], asyncio.Future[None]]] = []

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return not self._flowing.is_set()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def wait_for(self, predicate: Callable[[LinkStats], bool]) -> LinkStats:
        """Return once ``predicate(stats)`` holds (checked at every connection event and cut):
        tests synchronise on the link, not on sleeps."""
        if not predicate(self.stats):
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((predicate, future))
            try:
                await future
            finally:
                self._waiters = [w for w in self._waiters if w[1] is not future]
        return self.stats

    def _bump(self, **deltas: int) -> None:
        for key, delta in deltas.items():
            setattr(self.stats, key, getattr(self.stats, key) + delta)
        for predicate, future in self._waiters:
            if not future.done() and predicate(self.stats):
                future.set_result(None)

    # ------------------------------------------------------------------ faults
    def cut(self, seconds: float, *, reset_after: bool = True, reset_now: bool = False) -> None:
        """Black-hole the link for ``seconds`` (math.inf: until ``heal()``); repeated cuts extend it.

        ``reset_now``: its connections are also reset at once, so both ends know they are cut off
        now (a network that goes away with its socket), not after a keepalive; new connections
        still get nowhere until the cut heals.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if self.is_cut and until <= self._cut_until:
            return
        started = not self.is_cut
        self._cut_until = until
        self._reset_after_cut = reset_after
        self._flowing.clear()
        if started:
            self._bump(cuts=1)
            log.info("link %s cut for %gs", self.name, seconds)
            if not math.isinf(seconds):
                self._spawn(self._heal_when_due(), name=f"netem:{self.name}:heal")
        if reset_now:
            for task in list(self._handlers):
                task.cancel(msg="cut")

    def cut_at_next_upload(self, seconds: float, *, reset_after: bool = True, deliver: bool = False) -> None:
        """Cut the link the moment its client starts an upload (a device vanishing mid-upload), or,
        with ``deliver``, once the upload went through, at the first bytes coming back (its
        acknowledgement is lost: the sender cannot know it arrived and must send it again)."""
        self._upload_cut = (seconds, reset_after, deliver)

    async def _heal_when_due(self) -> None:
        loop = asyncio.get_running_loop()
        # A timer, not a poll: it sleeps to the cut's end, and again if cut() extended the cut meanwhile.
        while self.is_cut and not math.isinf(self._cut_until) and loop.time() < self._cut_until:  # noqa: ASYNC110
            await asyncio.sleep(self._cut_until - loop.time())
        if self.is_cut and not math.isinf(self._cut_until):
            self.heal()

    def heal(self) -> None:
        """End a cut; its connections are reset unless the cut was made with ``reset_after=False``."""
        if not self.is_cut:
            return
        if self._reset_after_cut:
            for task in list(self._handlers):
                task.cancel(msg="cut")
        self._flowing.set()
        log.info("link %s healed", self.name)

    # ------------------------------------------------------------------ connections
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_CONNECTIONS:
            self._bump(refused=1)
            _abort(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._bump(connections=1, open=1)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # a cut healed with a reset, or the proxy is closing; cancelled by us, so do not re-raise into asyncio's server
            if self._reset_after_cut and self._server is not None:
                self._bump(cut_resets=1)
        except _Reset:
            self._bump(resets=1)
        except OSError as exc:
            log.debug("link %s: connection ended: %s", self.name, exc)
        finally:
            _abort(writer)
            self._handlers.discard(task)
            self._bump(open=-1)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        _linger_zero(client_writer)
        await self._flowing.wait()  # a black hole: a new connection gets nowhere until the cut heals
        async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            _linger_zero(up_writer)
            async with asyncio.TaskGroup() as group:
                for src, dst, direction in ((client_reader, up_writer, "up"), (up_reader, client_writer, "down")):
                    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
                    group.create_task(self._read(src, queue, direction))
                    group.create_task(self._write(queue, dst, direction))
        except BaseExceptionGroup as errors:
            if errors.subgroup(_Reset) is not None:
                raise _Reset() from None
            rest = errors.subgroup(lambda e: not isinstance(e, (OSError, ExceptionGroup)))
            if rest is not None:
                raise  # not a connection ending (one side closed or failed): a bug
        finally:
            _abort(up_writer)

    async def _read(self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]], direction: str) -> None:
        loop = asyncio.get_running_loop()
        last_due = 0.0
        while True:
            chunk = await src.read(CHUNK)
            if not chunk:
                await queue.put((last_due, b""))  # EOF: close after what is queued
                return
            if self.profile.reset_prob and self._rng.random() < self.profile.reset_prob:
                raise _Reset()
            if direction == "up" and self._upload_cut is not None and (len(chunk) >= UPLOAD_BYTES or UPLOAD_MARKER in chunk):
                seconds, reset_after, deliver = self._upload_cut
                self._upload_cut = None
                if deliver:
                    self._ack_cut = (seconds, reset_after)
                else:
                    self.cut(seconds, reset_after=reset_after)
            elif direction == "down" and self._ack_cut is not None:
                seconds, reset_after = self._ack_cut
                self._ack_cut = None
                self.cut(seconds, reset_after=reset_after)
                continue  # the acknowledgement falls into the black hole
            last_due = max(last_due, loop.time() + self._delay())
            await queue.put((last_due, chunk))

    def _delay(self) -> float:
        p = self.profile
        jitter = self._rng.uniform(-p.jitter_ms, p.jitter_ms) if p.jitter_ms else 0.0
        return max(0.0, p.latency_ms + jitter) / 1000.0

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter, direction: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, chunk = await queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            await self._flowing.wait()
            if not chunk:
                raise _Closed()
            if self.profile.bandwidth_kbps:
                await asyncio.sleep(len(chunk) * 8 / (self.profile.bandwidth_kbps * 1000))
                await self._flowing.wait()
            dst.write(chunk)
            await dst.drain()
            self._bump(**{f"bytes_{direction}": len(chunk), "chunks": 1})


class _Closed(OSError):
    """One side closed: the connection ends (MQTT has no use for half-closed sockets)."""


def _linger_zero(writer: asyncio.StreamWriter) -> None:
    """Make abort() send a TCP RST, as a dropped mobile connection or a crashed NAT would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()

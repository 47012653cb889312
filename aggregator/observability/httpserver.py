"""A tiny read-only HTTP server for the aggregator's own pages (metrics, dashboard).

A handful of ``GET``/``HEAD`` routes, each rendering bytes from the aggregator's in-memory state,
served from an ``asyncio`` server owned by an async context manager: no thread outlives the
aggregator, and every handler runs on the aggregator's event loop, so a route reads the state
between two messages, never half-way through one. A route renders with a coroutine: what it
reads from disk (the store's history) it awaits from the store's thread, never on the loop. HTTP/1.0, one request per connection: the
clients are Prometheus scrapers and a browser polling once a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from fedge_contract.aio import cancel_and_wait

log = logging.getLogger("fedge.aggregator.http")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}


@dataclass(frozen=True)
class Route:
    content_type: str
    render: Callable[[], Awaitable[bytes]]


class HttpServer:
    """``routes`` (path -> Route) over HTTP/1.0 on ``host:port`` (port 0: a free one, see ``.port``) while the block runs."""

    def __init__(self, routes: Mapping[str, Route], host: str = "127.0.0.1", port: int = 0, *, name: str = "http") -> None:
        self.routes = dict(routes)
        self.host = host
        self.port = port
        self.name = name
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()  # Python 3.11's Server.wait_closed does not wait for them

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s on %s (%s)", self.name, self.url, " ".join(sorted(self.routes)))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
            await cancel_and_wait(list(self._handlers))
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            async with asyncio.timeout(10):  # a client that never finishes its request does not hold a socket
                request = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = request.partition(b" ")
            target = rest.split(b" ", 1)[0].decode("latin-1")
            route = self.routes.get(target.split("?", 1)[0])
            if method not in (b"GET", b"HEAD"):
                self._respond(writer, 405, b"method not allowed\n", "text/plain")
            elif route is None:
                self._respond(writer, 404, f"not found: try {', '.join(sorted(self.routes))}\n".encode(), "text/plain")
            else:
                body = await route.render()
                self._respond(writer, 200, b"" if method == b"HEAD" else body, route.content_type, length=len(body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str, *, length: int | None = None) -> None:
        head = (f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\nCache-Control: no-store\r\n")
        writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)

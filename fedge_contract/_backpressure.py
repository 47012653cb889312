"""Backpressure for a consumer that falls behind: stop reading the socket, let the broker hold the rest.

A consumer that falls behind a flood (a thousand devices uploading at once) would otherwise hold
every message the broker pushes, and MQTT 5's Receive Maximum cannot bound it on Mosquitto 2.0.x
(measured here: each PUBACK releases a whole quota, its ``db__message_delete_outgoing`` counts only
the messages in flight before the acknowledged one). Not reading the socket is a bound that holds
against any broker: the kernel buffers fill, the broker keeps the backlog in the client's session,
and delivery resumes where it stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomqtt

from fedge_contract import _aiomqtt_compat as compat


class PausableReader:
    """Reads one aiomqtt client's socket through a reader that can be paused.

    aiomqtt 2.x registers its own reader when paho opens the socket; this replaces it (right after,
    on the loop) with one that reads the same way and can be removed and added back. A read error
    ends the connection, as aiomqtt's own reader does.
    """

    def __init__(self, client: aiomqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._fd: int | None = None
        self._closed = False
        self.paused = False
        self.pauses = 0  # times reading was paused (tests, logs)
        compat.on_socket(client, loop, opened=self._take_over, closing=self._on_close)

    def _on_close(self) -> None:
        self._closed = True

    def _take_over(self, fd: int) -> None:
        if self._closed:
            return  # closed before we got here: the fd may already be another socket's
        self._fd = fd
        if self.paused:
            self._loop.remove_reader(fd)
        else:
            self._loop.add_reader(fd, self._read)  # replaces aiomqtt's reader for this fd

    def _read(self) -> None:
        try:
            compat.read_available(self._client)
        except Exception as exc:  # a broken socket (OSError, TLS, paho): end this connection
            compat.end_connection(self._client, exc)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            if self._fd is not None and not self._closed:
                self._loop.remove_reader(self._fd)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self._fd is not None and not self._closed:
                self._loop.add_reader(self._fd, self._read)


class Inbox(asyncio.Queue[aiomqtt.Message]):
    """A connection's message queue, which aiomqtt fills directly and which tells its connection
    whenever a message comes or goes (the reading gate watches its length).

    One queue for every client of the connection (see ``_aiomqtt_compat.inbox_factory``).
    """

    def __init__(self, on_change: Callable[[], None]) -> None:
        super().__init__()
        self._on_change = on_change

    def _put(self, message: aiomqtt.Message) -> None:
        super()._put(message)
        self._on_change()

    def _get(self) -> aiomqtt.Message:
        message = super()._get()
        self._on_change()
        return message

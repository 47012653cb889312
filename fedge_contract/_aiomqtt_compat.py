"""Every use fedge makes of aiomqtt's and paho-mqtt's private parts, in one place, version-checked.

fedge's Connection needs five things aiomqtt 2.x and paho 2.x have no public API for. Each function below says
which and why; all of them rely on aiomqtt 2.x keeping the paho client in ``Client._client``, its
connection state in the ``_disconnected`` future and its pending acks in ``_pending_subscribes``/
``_pending_unsubscribes``, and on paho's ``on_socket_open``/``on_socket_close`` hooks (which aiomqtt
sets and we wrap). aiomqtt 3 reworks the client; ``SUPPORTED`` is checked when this module is
imported, so a version that would break these assumptions fails at import with a clear message,
not with an ``AttributeError`` in the middle of a reconnect.

1. The socket's close as ground truth (``socket_closed``): aiomqtt 2.5 ignores a disconnect that
   comes before the CONNACK and forgets one that comes just after it (found with fedge.netem).
2. Reading the socket through a reader fedge can pause (``on_socket``, ``read_available``,
   ``end_connection``): backpressure for a consumer that falls behind (see ``_backpressure``).
3. Waiting for the connection to end (``until_disconnected``) and retrieving how it ended
   (``retrieve_disconnect``) without asyncio logging "exception was never retrieved".
4. Acks of calls nobody awaits any more (``drop_late_acks``): aiomqtt forgets a subscribe or
   unsubscribe that was cancelled or timed out, then logs its late SUBACK/UNSUBACK as an error
   with a ``KeyError`` traceback (issue 19).
5. Writing a large message without copying it over and over (``zero_copy_writes``): paho slices
   the rest of an outgoing packet on every partial send, which copies it.
Plus two details of aiomqtt's own API used in an unintended way: ``queue_type`` given a factory of
one shared queue (``inbox_factory``), and aiomqtt's socket-housekeeping task, awaited at teardown
so no task outlives a connection (``stop_housekeeping``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
from collections.abc import Callable
from typing import Any

import aiomqtt

SUPPORTED = ">=2.3,<3"
_LOWEST, _BELOW = (2, 3), (3, 0)
log = logging.getLogger("fedge.mqtt")


def check_version(version: str) -> None:
    """Raise ImportError unless ``version`` is in ``SUPPORTED`` (what these functions were written against)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    found = (int(match.group(1)), int(match.group(2))) if match else None
    if found is None or not _LOWEST <= found < _BELOW:
        raise ImportError(
            f"fedge needs aiomqtt {SUPPORTED}, found {version}: fedge_contract reaches into aiomqtt 2.x internals "
            f"(fedge_contract/_aiomqtt_compat.py); install a supported one with pip install 'aiomqtt{SUPPORTED}'"
        )


check_version(importlib.metadata.version("aiomqtt"))


def _paho(client: aiomqtt.Client) -> Any:
    return client._client


def inbox_factory(queue: asyncio.Queue[aiomqtt.Message]) -> Any:
    """A ``queue_type`` for aiomqtt that hands it ``queue`` itself (it expects a class to instantiate).

    One queue for every client of a connection: a message needs no hop from the client's queue to
    the connection's, which cost a task, an ``asyncio.wait`` and a queue operation per message.
    """
    return lambda maxsize=0: queue


def socket_closed(client: aiomqtt.Client) -> asyncio.Event:
    """An event set when ``client``'s socket closes, chained after aiomqtt's own close hook."""
    closed = asyncio.Event()
    loop = asyncio.get_running_loop()
    paho = _paho(client)
    original = paho.on_socket_close

    def on_socket_close(c: Any, userdata: Any, sock: Any) -> None:
        if original is not None:
            original(c, userdata, sock)
        loop.call_soon_threadsafe(closed.set)  # paho may call this from the connect executor thread

    paho.on_socket_close = on_socket_close
    return closed


def on_socket(client: aiomqtt.Client, loop: asyncio.AbstractEventLoop, *, opened: Callable[[int], None], closing: Callable[[], None]) -> None:
    """Call ``opened(fd)`` on the loop right after aiomqtt registered its reader for a new socket (so
    a reader added then replaces aiomqtt's), and ``closing()`` in paho's thread before aiomqtt's close hook."""
    paho = _paho(client)
    original_open, original_close = paho.on_socket_open, paho.on_socket_close

    def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
        original_open(c, userdata, sock)  # aiomqtt schedules its reader (call_soon_threadsafe): ours goes after it
        loop.call_soon_threadsafe(opened, sock.fileno())

    def on_socket_close(c: Any, userdata: Any, sock: Any) -> None:
        closing()
        original_close(c, userdata, sock)

    paho.on_socket_open = on_socket_open
    paho.on_socket_close = on_socket_close


def read_available(client: aiomqtt.Client) -> None:
    """Read what the socket has, as aiomqtt's own reader does: ``loop_read`` until TLS holds no
    decrypted bytes (paho issue 131). Raises what the socket raises."""
    paho = _paho(client)
    while True:
        paho.loop_read()
        sock = paho._sock
        if not (hasattr(sock, "pending") and sock.pending() > 0):
            return


def end_connection(client: aiomqtt.Client, error: BaseException) -> None:
    """End ``client``'s connection with ``error``, as aiomqtt does when its reader fails."""
    disconnected: asyncio.Future[None] = client._disconnected
    if not disconnected.done():
        disconnected.set_exception(error)


async def until_disconnected(client: aiomqtt.Client) -> BaseException | None:
    """Wait for the connection to end; the error that ended it (None: a clean disconnect).

    Shielded: a caller that stops waiting leaves aiomqtt's future alone.
    """
    disconnected: asyncio.Future[None] = client._disconnected
    try:
        await asyncio.shield(disconnected)
    except asyncio.CancelledError:
        if not disconnected.cancelled():
            raise  # we were cancelled, not the future
        return None
    except Exception as error:  # whatever ended the connection is the answer, not our error
        return error
    return None


def retrieve_disconnect(client: aiomqtt.Client) -> None:
    """Mark how the connection ended as seen (nobody awaits it after a teardown)."""
    disconnected = getattr(client, "_disconnected", None)
    if isinstance(disconnected, asyncio.Future) and disconnected.done() and not disconnected.cancelled():
        disconnected.exception()


def drop_late_acks(client: aiomqtt.Client) -> None:
    """Let a SUBACK or UNSUBACK whose call was abandoned pass quietly instead of as an error.

    aiomqtt removes a subscribe's pending entry when the caller stops waiting (cancelled, timed
    out); if the connection stays up, the broker's ack then arrives for an id aiomqtt no longer
    knows, and aiomqtt logs ``Unexpected message ID`` with a ``KeyError`` traceback: noise that
    hid real errors in agents' logs. Such an ack is expected here and says nothing is wrong.
    """
    paho = _paho(client)
    on_subscribe, on_unsubscribe = paho.on_subscribe, paho.on_unsubscribe
    pending_subscribes = getattr(client, "_pending_subscribes", None)
    pending_unsubscribes = getattr(client, "_pending_unsubscribes", None)
    if not isinstance(pending_subscribes, dict) or not isinstance(pending_unsubscribes, dict):
        return  # another 2.x layout: its acks are left as aiomqtt handles them

    def guarded(callback: Callable[..., None], pending: dict[int, Any], kind: str) -> Callable[..., None]:
        def on_ack(c: Any, userdata: Any, mid: int, *rest: Any) -> None:
            if mid in pending:
                callback(c, userdata, mid, *rest)
            else:
                log.debug("%s for message id %d, whose call was abandoned (cancelled or timed out)", kind, mid)

        return on_ack

    paho.on_subscribe = guarded(on_subscribe, pending_subscribes, "SUBACK")
    paho.on_unsubscribe = guarded(on_unsubscribe, pending_unsubscribes, "UNSUBACK")


def zero_copy_writes(client: aiomqtt.Client) -> None:
    """Queue outgoing packets as memoryviews, so that paho's partial sends slice without copying.

    paho 2.x's ``_packet_write`` sends ``packet[pos:]`` until the socket is full, and for a
    bytearray each slice copies the whole rest: a 100 MB global model, sent in 2-4 MB pieces,
    was copied ~2 GB on the event loop (1.0-1.4 s in one callback, measured with
    bench/loop_stall.py). A memoryview's slices are views; paho only slices and measures the
    packet, and keeps it alive until it is sent.
    """
    paho = _paho(client)
    queue = paho._packet_queue

    def queue_view(command: int, packet: bytes | bytearray, mid: int, qos: int, info: Any = None) -> Any:
        return queue(command, memoryview(packet) if len(packet) > _COPY_IS_CHEAP else packet, mid, qos, info)

    paho._packet_queue = queue_view


_COPY_IS_CHEAP = 64 * 1024  # bytes: below this a slice costs less than a view's bookkeeping


async def stop_housekeeping(client: aiomqtt.Client) -> None:
    """Cancel and await aiomqtt's ``loop_misc`` task (keepalive pings), which aiomqtt only cancels."""
    from fedge_contract.aio import cancel_and_wait

    task = getattr(client, "_misc_task", None)
    if isinstance(task, asyncio.Task):
        await cancel_and_wait([task])

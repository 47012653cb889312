"""How fedge programs reach the broker: broker URLs and MQTT client conventions.

Everything fedge publishes is QoS 1 over MQTT 5. Long-lived programs (agents, the aggregator)
use persistent sessions: ``clean_start=False`` plus a session expiry, so that QoS 1 messages
addressed to them while they are away (receipts, updates) wait in the broker. aiomqtt's default
(clean start on a new client) would wipe the session on every reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge_contract.aio import cancel_and_wait

QOS = 1
log = logging.getLogger("fedge.mqtt")


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None  # a client certificate (and its key) for brokers that ask for one
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str, *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> BrokerAddress:
        if "://" not in url:
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        try:
            port = parts.port if parts.port is not None else (8883 if tls else 1883)
        except ValueError:
            raise ValueError(f"broker URL {url!r} has an invalid port") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"broker URL {url!r}: port must be 1-65535")
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def make_client(
    address: BrokerAddress,
    identifier: str,
    *,
    persistent: bool,
    session_expiry: int = 3600,
    keepalive: int = 30,
    will: aiomqtt.Will | None = None,
    timeout: float = 10.0,
    receive_maximum: int | None = None,
    queue: asyncio.Queue[aiomqtt.Message] | None = None,
) -> aiomqtt.Client:
    """An MQTT 5 client with fedge's conventions; a persistent one keeps its session for ``session_expiry`` s.

    ``receive_maximum``: QoS 1 messages the broker may send before this client acknowledged them
    (MQTT 5 flow control; see ``Connection``'s ``max_buffered`` for why fedge uses 1).
    ``queue``: where incoming messages go (default: a new queue of the client's own).
    """
    properties = Properties(PacketTypes.CONNECT)
    if persistent:
        properties.SessionExpiryInterval = session_expiry
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    tls_context = None
    if address.tls:
        tls_context = ssl.create_default_context(cafile=address.ca_file)
        if address.cert_file:
            tls_context.load_cert_chain(address.cert_file, address.key_file)
    return aiomqtt.Client(
        address.host,
        address.port,
        identifier=identifier,
        username=address.username,
        password=address.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=not persistent,
        properties=properties,
        keepalive=keepalive,
        will=will,
        tls_context=tls_context,
        timeout=timeout,
        queue_type=cast(Any, (lambda maxsize=0: queue)) if queue is not None else None,
        # Nagle plus delayed ACKs adds ~40 ms to each small QoS 1 exchange (receipts, PUBACKs):
        # a round trip per update that a fleet would pay every round.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


@dataclass
class Backoff:
    """Capped full-jitter exponential backoff (AWS architecture blog, "Exponential Backoff and Jitter").

    A fleet that lost its broker reconnects spread out over ``[0, min(cap, base * 2**n)]``
    instead of all at once. ``rng`` is injectable so tests are deterministic.
    """

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def delays(self) -> Iterator[float]:
        attempt = 0
        while True:
            yield self.rng.uniform(0.0, min(self.cap, self.base * 2**attempt))
            attempt = min(attempt + 1, 32)


def _socket_closed(client: aiomqtt.Client) -> asyncio.Event:
    """An event set when ``client``'s socket closes (paho's on_socket_close, which aiomqtt 2.x also uses)."""
    closed = asyncio.Event()
    loop = asyncio.get_running_loop()
    paho = client._client  # aiomqtt 2.x keeps the paho client here (pinned: aiomqtt<3)
    original = paho.on_socket_close

    def on_socket_close(c: object, userdata: object, sock: object) -> None:
        if original is not None:
            original(c, userdata, sock)
        loop.call_soon_threadsafe(closed.set)  # paho may call this from the connect executor thread

    paho.on_socket_close = on_socket_close
    return closed


class _PausableReader:
    """Reads one aiomqtt client's socket through a reader that can be paused: TCP backpressure.

    A consumer that falls behind a flood (a thousand devices uploading at once) would otherwise
    hold every message the broker pushes, and MQTT 5's Receive Maximum cannot bound it on
    Mosquitto 2.0.x (measured here: each PUBACK releases a whole quota, its
    ``db__message_delete_outgoing`` counts only the messages in flight before the acknowledged
    one). Not reading the socket is a bound that holds against any broker: the kernel buffers
    fill, the broker keeps the backlog in the client's session, and delivery resumes where it
    stopped.

    aiomqtt 2.x registers its own reader when paho opens the socket; this replaces it (right
    after, on the loop) with one that reads the same way (``loop_read`` until TLS has nothing
    pending; an error ends the connection through the client's ``_disconnected`` future) and
    can be removed and added back. Pinned to aiomqtt<3, like ``_socket_closed``.
    """

    def __init__(self, client: aiomqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._fd: int | None = None
        self._closed = False
        self.paused = False
        self.pauses = 0  # times reading was paused (tests, logs)
        paho = client._client
        opened, closed = paho.on_socket_open, paho.on_socket_close

        def on_socket_open(c: object, userdata: object, sock: Any) -> None:
            opened(c, userdata, sock)  # aiomqtt schedules its reader (call_soon_threadsafe): ours is scheduled after it
            loop.call_soon_threadsafe(self._take_over, sock.fileno())

        def on_socket_close(c: object, userdata: object, sock: Any) -> None:
            self._closed = True
            closed(c, userdata, sock)

        paho.on_socket_open = on_socket_open
        paho.on_socket_close = on_socket_close

    def _take_over(self, fd: int) -> None:
        if self._closed:
            return  # closed before we got here: the fd may already be another socket's
        self._fd = fd
        if self.paused:
            self._loop.remove_reader(fd)
        else:
            self._loop.add_reader(fd, self._read)  # replaces aiomqtt's reader for this fd

    def _read(self) -> None:
        paho = self._client._client
        try:
            while True:
                paho.loop_read()
                sock = paho._sock
                if not (hasattr(sock, "pending") and sock.pending() > 0):  # TLS may hold decrypted bytes
                    break
        except Exception as exc:  # a broken socket: end this connection, as aiomqtt's own reader does
            disconnected = self._client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)

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


class _Inbox(asyncio.Queue[aiomqtt.Message]):
    """A connection's message queue, which aiomqtt fills directly (``queue_type``) and which tells
    its connection whenever a message comes or goes (the reading gate watches its length).

    One queue for every client of the connection: a message needs no hop from the client's queue
    to ours, which cost a task, an ``asyncio.wait`` and a queue operation per message.
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


class Connection:
    """A self-healing MQTT connection owned by an async context manager.

    Entering starts one task that connects, subscribes, runs ``on_connect`` and feeds every
    incoming message into ``messages``; when the connection drops it waits a backoff delay and
    connects again. Leaving cancels and awaits that task. ``publish`` waits for a connection and
    retries after a drop, so callers publish idempotent messages (receipts, retained state,
    updates keyed by update_id) without caring about the network.

    ``subscribe``/``unsubscribe`` change the subscriptions at run time (a receiver fetching the
    chunks of a large message); every connection subscribes the current list. A persistent
    session keeps its subscriptions in the broker across connections, so an unsubscribe that could
    not reach the broker is sent again at the next connect: a dropped subscription never lingers.
    """

    def __init__(
        self,
        address: BrokerAddress,
        identifier: str,
        *,
        subscriptions: list[str],
        persistent: bool,
        will: aiomqtt.Will | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        keepalive: int = 30,
        session_expiry: int = 3600,
        publish_timeout: float = 30.0,
        max_buffered: int | None = None,
    ) -> None:
        if max_buffered is not None and max_buffered < 2:
            raise ValueError(f"max_buffered must be >= 2, got {max_buffered}")
        self.address = address
        self.identifier = identifier
        self.subscriptions = list(subscriptions)  # ours: subscribe()/unsubscribe() change it
        self.persistent = persistent
        self.will = will
        self.on_connect = on_connect
        self.backoff = backoff or Backoff()
        self.sleep = sleep
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.publish_timeout = publish_timeout
        # Backpressure (see _PausableReader): reading pauses at max_buffered waiting messages and
        # resumes at half of it, or at once while a caller waits for an ack from the broker.
        self.max_buffered = max_buffered
        self.messages: asyncio.Queue[aiomqtt.Message] = _Inbox(self._update_gate)
        self._reader: _PausableReader | None = None
        self._holds = 0  # callers waiting for an ack (publish, subscribe, flush): reading must go on
        self._background: set[asyncio.Task[None]] = set()  # publish_soon's publishes, awaited by flush
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects so far
        self.bytes_published = 0
        self._client: aiomqtt.Client | None = None
        self._unsubscribed: set[str] = set()  # dropped from `subscriptions`, not yet confirmed by the broker
        self._dropped = asyncio.Event()  # set when the current connection ends (a new one per connection)
        self._delays = self.backoff.delays()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Connection:
        self._task = asyncio.create_task(self._run(), name=f"mqtt:{self.identifier}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await cancel_and_wait(list(self._background))  # flush() first to send them: leaving abandons them
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _run(self) -> None:
        self._delays = self.backoff.delays()
        while True:
            try:
                await self._connect_once()
            except aiomqtt.MqttError as exc:
                if self.connected.is_set() or self.connections == 0:
                    log.warning("connection to %s lost or refused (%s); reconnecting", self.address, exc)
            finally:
                self.connected.clear()
                self._dropped.set()
                self._client = None
                self._reader = None  # the next connection reads through a new one, not paused
            await self.sleep(next(self._delays))

    async def _connect_once(self) -> None:
        """One connection, from handshake to drop, ended early if its socket closes.

        aiomqtt 2.5 ignores a disconnect that comes before the CONNACK and forgets one that comes
        just after it, so a connection reset during the handshake cost the whole timeout (10 s),
        or left the message loop waiting on a dead socket for good (found with fedge.netem). The
        paho socket's close is the ground truth: it ends the session whatever aiomqtt believes.
        """
        client = make_client(
            self.address, self.identifier, persistent=self.persistent, will=self.will,
            keepalive=self.keepalive, session_expiry=self.session_expiry,
            # With backpressure, the broker keeps at most one message ahead of our acks in the TCP
            # stream, so a PUBACK or SUBACK we wait for never queues behind a flood. One, not more:
            # Mosquitto 2.0.x releases a whole quota per PUBACK (see _PausableReader), which only
            # stays exact at a quota of one.
            receive_maximum=1 if self.max_buffered else None,
            queue=self.messages,
        )
        closed = _socket_closed(client)
        self._reader = _PausableReader(client, asyncio.get_running_loop()) if self.max_buffered else None
        session = asyncio.create_task(self._session(client), name=f"mqtt-session:{self.identifier}")
        # How it ended is read below, unless we are cancelled meanwhile (leaving the connection):
        # then nobody would, and asyncio would log "Task exception was never retrieved".
        session.add_done_callback(lambda task: task.cancelled() or task.exception())
        watcher = asyncio.create_task(closed.wait())
        try:
            await asyncio.wait({session, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([t for t in (session, watcher) if not t.done()])
            disconnected = getattr(client, "_disconnected", None)  # retrieved, so asyncio does not log it as lost
            if isinstance(disconnected, asyncio.Future) and disconnected.done() and not disconnected.cancelled():
                disconnected.exception()
        if not session.cancelled():
            session.result()  # the MqttError that ended it, if any
        raise aiomqtt.MqttError("the connection's socket closed")

    async def _session(self, client: aiomqtt.Client) -> None:
        async with client:
            await self._sync_subscriptions(client)
            self._client = client  # no await since the sync: later changes go to this client directly
            self._dropped = asyncio.Event()
            self.connections += 1
            self._delays = self.backoff.delays()
            self.connected.set()
            log.info("connected to %s as %s", self.address, self.identifier)
            # on_connect runs beside the message loop, not before it: it publishes, and a
            # publish on a connection that dies meanwhile would retry forever on the dead
            # client, since only the message loop notices the drop (found by the netem tests).
            hook = asyncio.create_task(self.on_connect(), name=f"on_connect:{self.identifier}") if self.on_connect else None
            try:
                await self._until_disconnected(client, hook)
            finally:
                if hook is not None and not hook.done():
                    await cancel_and_wait([hook])

    @staticmethod
    async def _until_disconnected(client: aiomqtt.Client, hook: asyncio.Task[None] | None) -> None:
        """Wait for the connection to end (aiomqtt 2.x's ``_disconnected`` future) and raise MqttError;
        an error in ``on_connect`` is raised as itself: it is not a network problem."""
        disconnected = client._disconnected
        waiting: set[asyncio.Future[Any]] = {disconnected, hook} if hook is not None else {disconnected}
        while True:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if hook is not None and hook in done:
                hook.result()
                waiting.discard(hook)
            if disconnected in done:
                cause = None if disconnected.cancelled() else disconnected.exception()
                raise aiomqtt.MqttError("disconnected") from cause

    async def _sync_subscriptions(self, client: aiomqtt.Client) -> None:
        """Make a new connection's subscriptions the current list, including changes made meanwhile."""
        done: set[str] = set()
        while True:
            todo = [t for t in self.subscriptions if t not in done]
            gone = sorted(self._unsubscribed)
            if not todo and not gone:
                return
            for topic in todo:
                await client.subscribe(topic, qos=QOS)
                done.add(topic)
            for topic in gone:
                if topic in self._unsubscribed:
                    await client.unsubscribe(topic)
                    self._unsubscribed.discard(topic)
                    done.discard(topic)

    async def subscribe(self, topic: str) -> None:
        """Subscribe (QoS 1) now and on every later connection.

        Returns once the broker acknowledged it, or at once while offline (the next connection
        subscribes it). Subscribing again to a filter makes the broker send its retained messages again.
        """
        self._unsubscribed.discard(topic)
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        await self._on_live_client(lambda client: client.subscribe(topic, qos=QOS, timeout=self.publish_timeout))

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; retried at the next connect if the broker did not confirm it."""
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)
        self._unsubscribed.add(topic)
        if await self._on_live_client(lambda client: client.unsubscribe(topic, timeout=self.publish_timeout)):
            if topic not in self.subscriptions:
                self._unsubscribed.discard(topic)

    async def _on_live_client(self, operation: Callable[[aiomqtt.Client], Awaitable[object]]) -> bool:
        """Run ``operation`` on the current connection if there is one; False if offline or cut off
        (the next connection's ``_sync_subscriptions`` does it then)."""
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            with self._reading_held():
                await self._unless_dropped(operation(client))
        except aiomqtt.MqttError as exc:
            log.info("subscription change interrupted (%s); the next connection makes it", exc)
            return False
        return True

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK, across reconnects if need be."""
        with self._reading_held():
            await self._publish(topic, payload, retain)

    def publish_soon(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """``publish`` in the background: the caller goes on at once, ``flush`` waits for everything sent so far.

        For answers that many messages produce (receipts): waiting for each PUBACK would make the
        consumer pay a broker round trip per message. A background publish does not hold the
        reading gate, so a consumer that is behind keeps its backpressure. Leaving the connection
        abandons what ``flush`` was not asked to wait for.
        """
        task = asyncio.create_task(self._publish(topic, payload, retain), name=f"publish:{topic}")
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background publish failed: %r", task.exception())

    async def flush(self) -> None:
        """Wait until every ``publish_soon`` so far has its PUBACK (reading goes on meanwhile)."""
        with self._reading_held():
            while self._background:
                await asyncio.wait(set(self._background))

    @contextlib.contextmanager
    def _reading_held(self) -> Iterator[None]:
        """The caller waits for an ack from the broker: keep reading the socket meanwhile, however
        far behind the consumer is, or the ack would wait behind a paused reader (a deadlock)."""
        self._holds += 1
        self._update_gate()
        try:
            yield
        finally:
            self._holds -= 1
            self._update_gate()

    def _update_gate(self) -> None:
        """Pause reading at ``max_buffered`` waiting messages, resume at half (hysteresis) or while held."""
        reader = self._reader
        if reader is None or self.max_buffered is None:
            return
        waiting = self.messages.qsize()
        if reader.paused:
            if self._holds or waiting <= self.max_buffered // 2:
                reader.resume()
        elif not self._holds and waiting >= self.max_buffered:
            reader.pause()

    @property
    def reading_pauses(self) -> int:
        """How often the current connection paused reading because its consumer was behind."""
        return self._reader.pauses if self._reader is not None else 0

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        while True:
            await self.connected.wait()
            client = self._client
            if client is None:
                await asyncio.sleep(0)
                continue
            try:
                await self._unless_dropped(client.publish(topic, payload, qos=QOS, retain=retain, timeout=self.publish_timeout))
                self.bytes_published += len(payload)
                return
            except aiomqtt.MqttError as exc:
                # A drop clears `connected` (the loop above then waits for the next connection);
                # a timeout on a live connection simply retries. QoS 1 may then deliver twice:
                # every fedge message is idempotent (update ids, receipts, retained state).
                log.info("publish to %s interrupted (%s); retrying", topic, exc)
                await asyncio.sleep(0.01)

    async def _unless_dropped(self, operation: Awaitable[object]) -> None:
        """``operation`` (a publish, subscribe or unsubscribe), abandoned as soon as the connection drops:
        aiomqtt would otherwise wait the whole ``publish_timeout`` for an ack that can no longer come
        (measured with the netem proxy: every connection reset mid-upload stalled the upload for 30 s)."""
        dropped = self._dropped
        attempt = asyncio.ensure_future(operation)
        watcher = asyncio.create_task(dropped.wait())
        try:
            await asyncio.wait({attempt, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([t for t in (attempt, watcher) if not t.done()])
        if not attempt.done() or attempt.cancelled():
            raise aiomqtt.MqttError("connection dropped before the broker's ack")
        attempt.result()


class Subscriber:
    """A passive watcher: its own clean-session connection, every non-empty payload handed to
    ``on_message`` in arrival order.

    For observers of a fleet (the simulation's wire tap and chaos controller, status tools,
    tests), not for the agent or the aggregator, which own their loops. Entering returns once
    subscribed, so nothing published afterwards is missed; leaving stops the consumer and closes
    the connection.
    """

    def __init__(self, address: BrokerAddress, identifier: str, subscriptions: list[str]) -> None:
        self._connection = Connection(address, identifier[:64], subscriptions=subscriptions, persistent=False)
        self._consumer: asyncio.Task[None] | None = None

    async def on_message(self, topic: str, payload: bytes) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self._connection.__aenter__()
        try:
            await self._connection.connected.wait()
        except BaseException:
            await self._connection.__aexit__(None, None, None)
            raise
        self._consumer = asyncio.create_task(self._consume(), name=f"subscriber:{self._connection.identifier}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._consumer is not None:
            await cancel_and_wait([self._consumer])
            self._consumer = None
        await self._connection.__aexit__(None, None, None)

    async def _consume(self) -> None:
        while True:
            message = await self._connection.messages.get()
            if isinstance(message.payload, bytes) and message.payload:
                await self.on_message(str(message.topic), message.payload)

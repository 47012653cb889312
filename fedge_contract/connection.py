"""The one MQTT connection every fedge program owns: self-healing, supervised, with backpressure.

A network problem (the broker away, a dropped connection, a timed-out ack) is healed: reconnect
on the schedule of ``fedge_contract.reconnect`` (a jittered wait that grows with the time offline),
publish again (every fedge message is idempotent). Anything
else (an ``on_connect`` that raises, a bug in a background publish or a Subscriber's handler) is
the connection's failure: it stops for good, every pending and later operation raises
``ConnectionFailed``, the owner's body is interrupted and its ``async with`` raises the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Self

import aiomqtt

from fedge_contract import _aiomqtt_compat as compat
from fedge_contract._backpressure import Inbox, PausableReader
from fedge_contract.aio import First, Second, race
from fedge_contract.errors import ConnectionFailed, ConnectionLost
from fedge_contract.mqtt_client import QOS, BrokerAddress, aiomqtt_client
from fedge_contract.reconnect import Backoff
from fedge_contract.supervisor import Supervisor

log = logging.getLogger("fedge.mqtt")

# What the network does to a connection: healed by reconnecting. Anything else is a failure.
_NETWORK_ERRORS = (aiomqtt.MqttError, ConnectionLost)


class Connection:
    """A self-healing MQTT connection owned by an async context manager.

    Entering starts its background work in a ``Supervisor`` owned by the ``async with``: one task
    connects, subscribes, runs ``on_connect`` and lets aiomqtt fill ``messages``; when the
    connection drops it waits a backoff delay and connects again. Leaving cancels and awaits all of
    it. ``publish`` waits for a connection and retries after a drop, so callers publish idempotent
    messages (receipts, retained state, updates keyed by update_id) without caring about the network.

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
        clock: Callable[[], float] = time.monotonic,
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
        self.clock = clock
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.publish_timeout = publish_timeout
        # Backpressure (see _backpressure): reading pauses at max_buffered waiting messages and
        # resumes at half of it, or at once while a caller waits for an ack from the broker.
        self.max_buffered = max_buffered
        self._inbox_changed = asyncio.Event()  # a message came or went, or the gate moved (wait_inbox)
        self.messages: asyncio.Queue[aiomqtt.Message] = Inbox(self._update_gate)
        self._reader: PausableReader | None = None
        self._holds = 0  # callers waiting for an ack (publish, subscribe, flush): reading must go on
        self._background: set[asyncio.Task[None]] = set()  # publish_soon's publishes, awaited by flush
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects so far
        self.bytes_published = 0
        self._client: aiomqtt.Client | None = None
        self._unsubscribed: set[str] = set()  # dropped from `subscriptions`, not yet confirmed by the broker
        self._dropped = asyncio.Event()  # set when the current connection ends (a new one per connection)
        self._connected_at: float | None = None  # clock() when the current connection was made
        self._supervisor: Supervisor | None = None
        self._ended = asyncio.Event()  # failed for good, or being left: waiting callers give up

    # ------------------------------------------------------------------ lifetime
    async def __aenter__(self) -> Self:
        supervisor = Supervisor(f"mqtt:{self.identifier}", on_failure=self._on_failure)
        await supervisor.__aenter__()
        self._supervisor = supervisor
        supervisor.spawn(self._run(), name=f"mqtt:{self.identifier}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Cancel and await everything (unflushed ``publish_soon``s are abandoned: ``flush`` first to
        send them); raise the connection's failure, if it failed."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        self._ended.set()  # in this same step the supervisor cancels its tasks: they see the cancellation, not this
        await supervisor.__aexit__(exc_type, exc, tb)

    def _on_failure(self, error: BaseException) -> None:
        log.error("MQTT connection %s to %s failed for good: %r", self.identifier, self.address, error)
        self._ended.set()

    def _end_error(self) -> ConnectionFailed:
        failure = self._supervisor.failure if self._supervisor is not None else None
        return ConnectionFailed(self.identifier, failure or RuntimeError("the connection's async with was left"))

    def _raise_if_ended(self) -> None:
        if self._ended.is_set():
            raise self._end_error()

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``coro`` beside the connection, owned by it: an error in it fails the connection."""
        if self._supervisor is None:
            coro.close()
            raise RuntimeError(f"connection {self.identifier}: enter it (async with) first")
        if self._ended.is_set():
            coro.close()
            raise self._end_error()
        return self._supervisor.spawn(coro, name=name)

    async def wait_connected(self) -> None:
        """Return once connected; ConnectionFailed if the connection fails for good (or is left) first."""
        await self._live_client()

    async def _live_client(self) -> aiomqtt.Client:
        while True:
            self._raise_if_ended()
            client = self._client
            if client is not None and self.connected.is_set():
                return client
            await race(self.connected.wait(), self._ended.wait())

    # ------------------------------------------------------------------ the connection loop
    async def _run(self) -> None:
        offline_since = self.clock()  # the end of the last stable connection (the backoff's outage)
        while True:
            try:
                await self._connect_once()
            except _NETWORK_ERRORS as exc:
                if self.connected.is_set() or self.connections == 0:
                    log.warning("connection to %s lost or refused (%s); reconnecting", self.address, exc)
            finally:
                self.connected.clear()
                self._dropped.set()
                self._client = None
                self._reader = None  # the next connection reads through a new one, not paused
            now = self.clock()
            if self._connected_at is not None and now - self._connected_at >= self.backoff.stable_after:
                offline_since = now  # a connection that lived: a new outage starts
            self._connected_at = None
            await self.sleep(self.backoff.delay(now - offline_since))

    async def _connect_once(self) -> None:
        """One connection, from handshake to drop, ended early if its socket closes.

        aiomqtt 2.5 ignores a disconnect that comes before the CONNACK and forgets one that comes
        just after it, so a connection reset during the handshake cost the whole timeout (10 s),
        or left the message loop waiting on a dead socket for good (found with fedge.netem). The
        paho socket's close is the ground truth: it ends the session whatever aiomqtt believes.
        """
        client = aiomqtt_client(
            self.address, self.identifier, persistent=self.persistent, will=self.will,
            keepalive=self.keepalive, session_expiry=self.session_expiry,
            # With backpressure, the broker keeps at most one message ahead of our acks in the TCP
            # stream, so a PUBACK or SUBACK we wait for never queues behind a flood. One, not more:
            # Mosquitto 2.0.x releases a whole quota per PUBACK (see _backpressure), which only
            # stays exact at a quota of one.
            receive_maximum=1 if self.max_buffered else None,
            queue=self.messages,
        )
        closed = compat.socket_closed(client)
        self._reader = PausableReader(client, asyncio.get_running_loop()) if self.max_buffered else None
        try:
            await race(self._session(client), closed.wait())
        finally:
            await compat.stop_housekeeping(client)
            compat.retrieve_disconnect(client)  # how it ended is read, so asyncio does not log it as lost
        raise ConnectionLost("the connection's socket closed")

    async def _session(self, client: aiomqtt.Client) -> None:
        async with client:
            await self._sync_subscriptions(client)
            self._client = client  # no await since the sync: later changes go to this client directly
            self._dropped = asyncio.Event()
            self.connections += 1
            self._connected_at = self.clock()
            self.connected.set()
            log.info("connected to %s as %s", self.address, self.identifier)
            if self.on_connect is not None:
                # on_connect runs beside the wait for the drop, not before it: it publishes, and a
                # publish on a connection that dies meanwhile would retry forever on the dead
                # client (found by the netem tests). Its error is raised as itself: not a network problem.
                won = await race(compat.until_disconnected(client), self.on_connect())
                if isinstance(won, First):
                    raise ConnectionLost("disconnected") from won.value
            raise ConnectionLost("disconnected") from await compat.until_disconnected(client)

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

    # ------------------------------------------------------------------ subscriptions
    async def subscribe(self, topic: str) -> None:
        """Subscribe (QoS 1) now and on every later connection.

        Returns once the broker acknowledged it, or at once while offline (the next connection
        subscribes it). Subscribing again to a filter makes the broker send its retained messages again.
        """
        self._raise_if_ended()
        self._unsubscribed.discard(topic)
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        await self._on_live_client(lambda client: client.subscribe(topic, qos=QOS, timeout=self.publish_timeout))

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; retried at the next connect if the broker did not confirm it."""
        self._raise_if_ended()
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)
        self._unsubscribed.add(topic)
        confirmed = await self._on_live_client(lambda client: client.unsubscribe(topic, timeout=self.publish_timeout))
        if confirmed and topic not in self.subscriptions:
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
        except _NETWORK_ERRORS as exc:
            self._raise_if_ended()
            log.info("subscription change interrupted (%s); the next connection makes it", exc)
            return False
        return True

    # ------------------------------------------------------------------ publishing
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
        task = self._spawn(self._publish(topic, payload, retain), name=f"publish:{topic}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def flush(self) -> None:
        """Wait until every ``publish_soon`` so far has its PUBACK (reading goes on meanwhile).

        ConnectionFailed if the connection failed (or was left) before they all had it.
        """
        with self._reading_held():
            while self._background:
                self._raise_if_ended()
                done, _ = await asyncio.wait(set(self._background))
                if self._ended.is_set() and any(task.cancelled() for task in done):
                    raise self._end_error()

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        while True:
            client = await self._live_client()
            try:
                await self._unless_dropped(client.publish(topic, payload, qos=QOS, retain=retain, timeout=self.publish_timeout))
                self.bytes_published += len(payload)
                return
            except _NETWORK_ERRORS as exc:
                # A drop clears `connected` (the loop above then waits for the next connection);
                # a timeout on a live connection simply retries. QoS 1 may then deliver twice:
                # every fedge message is idempotent (update ids, receipts, retained state).
                log.info("publish to %s interrupted (%s); retrying", topic, exc)
                await asyncio.sleep(0.01)

    async def _unless_dropped(self, operation: Awaitable[object]) -> None:
        """``operation`` (a publish, subscribe or unsubscribe), abandoned as soon as the connection drops:
        aiomqtt would otherwise wait the whole ``publish_timeout`` for an ack that can no longer come
        (measured with the netem proxy: every connection reset mid-upload stalled the upload for 30 s)."""
        if isinstance(await race(operation, self._dropped.wait()), Second):
            raise ConnectionLost("connection dropped before the broker's ack")

    # ------------------------------------------------------------------ backpressure
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
        self._inbox_changed.set()
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

    async def wait_inbox(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked again whenever a message comes or goes or the
        reading gate may have moved (e.g. ``messages.qsize()``, ``reading_pauses``): no polling."""
        while not predicate():
            self._inbox_changed.clear()
            await self._inbox_changed.wait()


class Subscriber:
    """A passive watcher: its own clean-session connection, every non-empty payload handed to
    ``on_message`` in arrival order.

    For observers of a fleet (the simulation's wire tap and chaos controller, status tools,
    tests), not for the agent or the aggregator, which own their loops. Entering returns once
    subscribed, so nothing published afterwards is missed; leaving stops the consumer and closes
    the connection. The consumer runs in the connection's supervisor: an ``on_message`` that
    raises fails the connection like an ``on_connect`` would (the owner's ``async with`` raises it).
    """

    def __init__(self, address: BrokerAddress, identifier: str, subscriptions: list[str]) -> None:
        self._connection = Connection(address, identifier[:64], subscriptions=subscriptions, persistent=False)

    async def on_message(self, topic: str, payload: bytes) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self._connection.__aenter__()
        try:
            await self._connection.wait_connected()
            self._connection._spawn(self._consume(), name=f"subscriber:{self._connection.identifier}")
        except BaseException:
            await self._connection.__aexit__(*sys.exc_info())  # raises the connection's failure, if that was it
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._connection.__aexit__(exc_type, exc, tb)

    async def _consume(self) -> None:
        while True:
            message = await self._connection.messages.get()
            if isinstance(message.payload, bytes) and message.payload:
                await self.on_message(str(message.topic), message.payload)

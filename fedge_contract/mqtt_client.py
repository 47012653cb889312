"""How fedge reaches a broker: broker URLs, fedge's MQTT 5 client conventions, a plain client.

Everything fedge publishes is QoS 1 over MQTT 5. Long-lived programs (agents, the aggregator)
use persistent sessions: ``clean_start=False`` plus a session expiry, so that QoS 1 messages
addressed to them while they are away (receipts, updates) wait in the broker. aiomqtt's default
(clean start on a new client) would wipe the session on every reconnect.

This module and ``connection`` are where fedge calls aiomqtt: its ``MqttError`` is translated into
``ConnectionLost`` here and never reaches a caller of fedge_contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge_contract import _aiomqtt_compat as compat
from fedge_contract.aio import Second, race
from fedge_contract.errors import ConnectionLost
from fedge_contract.reconnect import CONNECT_TIMEOUT

QOS = 1


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://`` URL, with the TLS files to use.

    ``cert_file``/``key_file``: a client certificate and its key (mqtts:// only, both or neither),
    for brokers that authenticate devices by certificate.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            given = "cert_file" if self.cert_file is not None else "key_file"
            raise ValueError(f"a client certificate needs both cert_file and key_file, got only {given}")
        if self.cert_file is not None and not self.tls:
            raise ValueError(f"a client certificate needs TLS: use mqtts:// instead of {self}")

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

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for mqtts:// (the CA to trust, the client certificate if any); None for mqtt://."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@contextlib.contextmanager
def lost_on_mqtt_error() -> Iterator[None]:
    """Translate aiomqtt's MqttError (unreachable, refused, dropped, timed out) into ConnectionLost."""
    try:
        yield
    except aiomqtt.MqttError as exc:
        raise ConnectionLost(str(exc)) from exc


def aiomqtt_client(
    address: BrokerAddress,
    identifier: str,
    *,
    persistent: bool,
    session_expiry: int = 3600,
    keepalive: int = 30,
    will: aiomqtt.Will | None = None,
    timeout: float = CONNECT_TIMEOUT,
    receive_maximum: int | None = None,
    queue: asyncio.Queue[aiomqtt.Message] | None = None,
) -> aiomqtt.Client:
    """An aiomqtt client with fedge's conventions (for ``Connection`` and ``Client``, which translate its errors).

    ``receive_maximum``: QoS 1 messages the broker may send before this client acknowledged them
    (MQTT 5 flow control; see ``Connection``'s ``max_buffered`` for why fedge uses 1).
    ``queue``: where incoming messages go (default: a new queue of the client's own).
    """
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if persistent:
        properties.SessionExpiryInterval = session_expiry
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    client = aiomqtt.Client(
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
        tls_context=address.tls_context(),
        timeout=timeout,
        queue_type=compat.inbox_factory(queue) if queue is not None else None,
        # Nagle plus delayed ACKs adds ~40 ms to each small QoS 1 exchange (receipts, PUBACKs):
        # a round trip per update that a fleet would pay every round.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    compat.drop_late_acks(client)
    compat.zero_copy_writes(client)
    return client


class Client:
    """One plain MQTT connection, no reconnect, with fedge's errors: for probes, tools, tests, benchmarks.

    ``async with`` connects and disconnects; every operation raises ConnectionLost when the network
    fails it. Long-lived programs use ``Connection``, which heals the network itself.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client

    @property
    def identifier(self) -> str:
        return self._client.identifier

    async def __aenter__(self) -> Self:
        """Connect; a broker that closes the socket during the handshake (a refused client certificate,
        a TLS alert) is ConnectionLost at once: aiomqtt alone would wait its whole timeout for a CONNACK."""
        closed = compat.socket_closed(self._client)
        with lost_on_mqtt_error():
            won = await race(self._client.__aenter__(), closed.wait())
        if isinstance(won, Second):
            await compat.stop_housekeeping(self._client)
            compat.retrieve_disconnect(self._client)
            raise ConnectionLost("the broker closed the connection during the handshake (refused credentials or certificate?)")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            with lost_on_mqtt_error():
                await self._client.__aexit__(exc_type, exc, tb)
        finally:
            await compat.stop_housekeeping(self._client)
            compat.retrieve_disconnect(self._client)

    async def publish(self, topic: str, payload: bytes, *, qos: int = QOS, retain: bool = False, timeout: float | None = None) -> None:
        with lost_on_mqtt_error():
            await self._client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)

    async def subscribe(self, topic: str, *, qos: int = QOS, timeout: float | None = None) -> None:
        with lost_on_mqtt_error():
            await self._client.subscribe(topic, qos=qos, timeout=timeout)

    async def unsubscribe(self, topic: str, *, timeout: float | None = None) -> None:
        with lost_on_mqtt_error():
            await self._client.unsubscribe(topic, timeout=timeout)

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        """Incoming messages until the connection ends (then ConnectionLost)."""
        return _Messages(self._client.messages)


class _Messages:
    """aiomqtt's message iterator with fedge's error (a class, not an async generator: a caller that
    breaks out of ``async for`` leaves nothing for asyncio to finalise later)."""

    def __init__(self, inner: AsyncIterator[aiomqtt.Message]) -> None:
        self._inner = inner

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> aiomqtt.Message:
        with lost_on_mqtt_error():
            return await self._inner.__anext__()


def make_client(
    address: BrokerAddress,
    identifier: str,
    *,
    persistent: bool,
    session_expiry: int = 3600,
    keepalive: int = 30,
    will: aiomqtt.Will | None = None,
    timeout: float = 10.0,
) -> Client:
    """A plain MQTT 5 client with fedge's conventions; a persistent one keeps its session for ``session_expiry`` s."""
    return Client(aiomqtt_client(
        address, identifier, persistent=persistent, session_expiry=session_expiry, keepalive=keepalive, will=will, timeout=timeout,
    ))

"""The device and server state machines wired together in memory, through their wire bytes.

A stand-in for the MQTT transport at unit level: every message is encoded, then decoded by the
receiver's strict decoder; broadcasts reach every device still there, addressed messages their
recipient. Devices drop out at a chosen phase. When nothing is in flight the clock jumps to the
server's deadline. Everything the server received or sent is kept (``server_saw``), and masked
inputs are spooled the way the aggregator's store would keep them (``spool``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from fedge_contract.secagg import (
    Abandoned,
    Aggregate,
    DeviceMessage,
    DevicePolicy,
    DeviceSession,
    KeyList,
    MaskedInput,
    ServerMessage,
    ServerSession,
    Setup,
    ShareBundle,
    UnmaskRequest,
    new_session_id,
)

MAX_BYTES = 1 << 26


@dataclass(frozen=True)
class Dropouts:
    """Who vanishes, and when."""

    before_keys: frozenset[str] = frozenset()  # never advertise
    after_keys: frozenset[str] = frozenset()  # advertised, gone before the key list
    after_shares: frozenset[str] = frozenset()  # sent shares, gone before the bundle
    after_masked: frozenset[str] = frozenset()  # sent the masked input, gone before the unmask request
    during_unmask: frozenset[str] = frozenset()  # got the unmask request; the answer is lost

    def gone_at(self, message: ServerMessage) -> frozenset[str]:
        if isinstance(message, KeyList):
            return self.before_keys | self.after_keys
        if isinstance(message, ShareBundle):
            return self.before_keys | self.after_keys | self.after_shares
        if isinstance(message, UnmaskRequest):
            return self.before_keys | self.after_keys | self.after_shares | self.after_masked
        return self.before_keys

    def expected_survivors(self, cohort: tuple[str, ...]) -> tuple[str, ...]:
        gone = self.before_keys | self.after_keys | self.after_shares
        return tuple(c for c in cohort if c not in gone)


def make_setup(n: int, *, degree: int = 8, threshold: int = 5, min_survivors: int | None = None, length: int = 16,
               bits: int = 32, clip: float = 8.0, seed: int = 0, round: int = 7) -> Setup:
    return Setup(
        fleet="fleet", round=round, session=new_session_id(random.Random(seed).randbytes), sender="aggregator",
        cohort=tuple(sorted(f"agent-{i:03d}" for i in range(n))), degree=degree, threshold=threshold,
        min_survivors=threshold if min_survivors is None else min_survivors, ring_bits=bits, length=length, clip=clip,
    )


def random_inputs(setup: Setup, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ring = setup.ring
    return {c: ring.reduce(rng.integers(0, 1 << 62, setup.length, dtype=np.uint64).astype(ring.dtype)) for c in setup.cohort}


def ring_sum(setup: Setup, inputs: dict[str, np.ndarray], members: tuple[str, ...]) -> np.ndarray:
    total = setup.ring.zeros(setup.length)
    for member in members:
        total = setup.ring.add(total, inputs[member])
    return total


@dataclass
class Relay:
    setup: Setup
    inputs: dict[str, np.ndarray]
    dropouts: Dropouts = field(default_factory=Dropouts)
    seed: int = 0
    policy: DevicePolicy = field(default_factory=DevicePolicy)
    submit_early: bool = False  # inputs ready before the bundle arrives (training done before the share phase)
    now: float = 0.0
    server_saw: list[bytes] = field(default_factory=list)
    spool: list[MaskedInput] = field(default_factory=list)
    held: frozenset[str] = frozenset()  # devices whose messages wait in ``inbox`` for the test to hand them over
    inbox: dict[str, list[ServerMessage]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rand = random.Random(self.seed).randbytes
        self.server = ServerSession(self.setup, now=self.now, random=rand)
        self.devices = {c: DeviceSession(self.setup, c, random=rand, policy=self.policy) for c in self.setup.cohort}
        self.in_flight: list[DeviceMessage] = []
        for message in self.server.pending():  # the Setup broadcast; each device was built from what it read
            self.server_saw.append(message.to_bytes())
        for client, device in self.devices.items():
            if self.submit_early:
                device.submit(self.inputs[client])
            if client not in self.dropouts.before_keys:
                self.in_flight.append(device.advertisement())

    def run_until(self, phase: object, limit: int = 20) -> None:
        """Step until the server is in ``phase`` (a Phase)."""
        for _ in range(limit):
            if self.server.phase is phase:
                return
            self.step()
        raise AssertionError(f"the server never reached {phase}")

    def last_to(self, client: str, kind: type[ServerMessage]) -> ServerMessage:
        """The newest message of ``kind`` held for ``client``."""
        return next(m for m in reversed(self.inbox.get(client, [])) if isinstance(m, kind))

    def run(self) -> Aggregate | Abandoned:
        """Until the server has an outcome."""
        while self.server.outcome is None:
            self.step()
        return self.server.outcome

    def step(self) -> None:
        """Deliver what is in flight (or, with nothing in flight, let the server's deadline pass)."""
        outgoing: list[ServerMessage] = []
        if not self.in_flight:
            self.now = max(self.now, self.server.deadline)
            outgoing += self.server.poll(now=self.now)
        for sent in self.in_flight:
            outgoing += self.to_server(sent)
        self.in_flight = []
        for message in outgoing:
            self.in_flight += self.to_devices(message)

    def to_server(self, message: DeviceMessage) -> tuple[ServerMessage, ...]:
        payload = message.to_bytes()
        self.server_saw.append(payload)
        decoded = type(message).from_bytes(payload, fleet=self.setup.fleet, max_bytes=MAX_BYTES)
        if isinstance(decoded, MaskedInput):
            self.spool.append(decoded)  # the aggregator spools it before handing it on
        return self.server.handle(decoded, now=self.now).send

    def to_devices(self, message: ServerMessage) -> list[DeviceMessage]:
        payload = message.to_bytes()
        self.server_saw.append(payload)
        recipients = [message.recipient] if isinstance(message, (KeyList, ShareBundle)) else list(self.devices)
        replies: list[DeviceMessage] = []
        for client in recipients:
            if client in self.dropouts.gone_at(message):
                continue
            if client in self.held:
                self.inbox.setdefault(client, []).append(type(message).from_bytes(payload))
                continue
            reply = self.devices[client].handle(type(message).from_bytes(payload, fleet=self.setup.fleet))
            if reply is None and isinstance(message, ShareBundle):
                reply = self.devices[client].submit(self.inputs[client])  # training finished after the shares came in
            if reply is not None and not (isinstance(message, UnmaskRequest) and client in self.dropouts.during_unmask):
                replies.append(reply)
        return replies


def crash_and_restore(relay: Relay, snapshot: dict[str, object], *, spool: list[MaskedInput] | None = None) -> None:
    """The aggregator dies (what is in flight is lost) and comes back from ``snapshot`` and the spool;
    it resends its current phase's messages, as a restarted coordinator would."""
    relay.in_flight = []
    relay.server = ServerSession.restore(
        snapshot, relay.spool if spool is None else spool, now=relay.now, random=random.Random(relay.seed + 1).randbytes,
    )
    for message in relay.server.pending():
        relay.in_flight += relay.to_devices(message)

"""The aggregator's secure-aggregation relay at unit level: a recording transport in place of MQTT,
DeviceSessions as the devices. Every hostile input is refused with a receipt-like reason, nothing
refused is spooled, and the session still ends with the exact sum. Also: the configuration check."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from aggregator.secagg_relay import (
    Refusal,
    SecAggRelay,
    SecAggSettings,
    SecureAggregationUnsupported,
    SecureMean,
    check_compatible,
    refusals,
)
from fedge_contract import ReceiptStatus
from fedge_contract.chunks import Manifest
from fedge_contract.errors import Reason
from fedge_contract.secagg import (
    Abandoned,
    DeviceSession,
    KeyAdvert,
    KeyList,
    MaskedInput,
    Phase,
    Setup,
    ShareBundle,
    UnmaskRequest,
)
from fedge_contract.secagg.topics import SecAggTopics
from fedge_contract.tensors import ModelSpec

FLEET = "lab"
SPEC = ModelSpec.of({"w": np.zeros(30, np.float32)})
TOPICS = SecAggTopics(FLEET)


class Recorder:
    """A transport that keeps what the relay publishes (retained state as a broker would hold it)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.published.append((topic, payload, retain))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)

    async def subscribe(self, topic: str) -> None:
        self.subscribed.append(topic)

    async def unsubscribe(self, topic: str) -> None:
        self.unsubscribed.append(topic)


class Harness:
    def __init__(self, n: int = 5) -> None:
        self.transport = Recorder()
        self.spool: list[tuple[str, str, bytes]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.clients = [f"dev-{i}" for i in range(n)]
        self.rand = random.Random(0).randbytes
        self.relay = SecAggRelay(FLEET, self.transport, SPEC, spool=self._spool, checkpoint=self._checkpoint, random=self.rand)
        self.devices: dict[str, DeviceSession] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.now = 0.0

    async def _spool(self, session: str, client: str, payload: bytes) -> None:
        self.spool.append((session, client, payload))

    async def _checkpoint(self, snapshot: dict[str, Any]) -> None:
        self.checkpoints.append(snapshot)

    async def start(self) -> Setup:
        setup = await self.relay.start(1, self.clients, now=self.now)
        rng = np.random.default_rng(0)
        for client in self.clients:
            self.devices[client] = DeviceSession(setup, client, random=self.rand)
            self.inputs[client] = setup.fixed_point.encode(np.concatenate([[1.0], rng.normal(0, 0.1, 30)]), rng)
        return setup

    async def send(self, topic: str, payload: bytes) -> list[Refusal]:
        return await self.relay.on_message(topic, payload, now=self.now)

    async def deliver(self, client: str, message: object) -> list[Refusal]:
        """``client``'s message on its own topic."""
        assert isinstance(message, (KeyAdvert, MaskedInput)) or hasattr(message, "to_bytes")
        return await self.send(TOPICS.device(type(message), client), message.to_bytes())  # type: ignore[arg-type, attr-defined]

    async def run(self) -> None:
        """Devices answer whatever the relay has retained for them, until it has an outcome."""
        for client, device in self.devices.items():
            assert await self.deliver(client, device.advertisement()) == []
        answered: set[tuple[str, bytes]] = set()
        while self.relay.outcome is None:
            progressed = False
            for topic, payload in list(self.transport.retained.items()):
                for client, device in self.devices.items():
                    kinds = {TOPICS.keys(client): KeyList, TOPICS.bundle(client): ShareBundle, TOPICS.unmask: UnmaskRequest}
                    if topic not in kinds or (client, payload) in answered:
                        continue
                    answered.add((client, payload))
                    reply = device.handle(kinds[topic].from_bytes(payload))
                    if reply is None and topic == TOPICS.bundle(client):
                        reply = device.submit(self.inputs[client])
                    if reply is not None:
                        assert await self.deliver(client, reply) == []
                        progressed = True
            if not progressed:
                raise AssertionError("stuck")


def _expected(h: Harness) -> np.ndarray:
    setup = h.relay.setup
    assert setup is not None
    total = setup.ring.zeros(setup.length)
    for vector in h.inputs.values():
        total = setup.ring.add(total, vector)
    return total


async def test_every_hostile_message_is_refused_with_a_reason_and_changes_nothing() -> None:
    h = Harness()
    assert await h.send(TOPICS.device(KeyAdvert, "dev-1"), b"\x00") == [
        Refusal("dev-1", TOPICS.device(KeyAdvert, "dev-1"), Reason.WRONG_SESSION, "no secure-aggregation session is running", None, None)
    ]
    setup = await h.start()
    advert = h.devices["dev-0"].advertisement()
    stranger = DeviceSession(Setup(**{**setup.__dict__, "cohort": (*setup.cohort, "zz-9")}), "zz-9", random=h.rand).advertisement()
    other_session = KeyAdvert(FLEET, 1, "another-session", "dev-2", advert.cipher_key, advert.mask_key)
    masked_early = MaskedInput(FLEET, 1, setup.session, "dev-3", 32, setup.length, bytes(4 * setup.length))
    cases: list[tuple[str, bytes, Reason]] = [
        (TOPICS.device(KeyAdvert, "dev-1"), b"\xc1 not msgpack", Reason.MALFORMED),
        (TOPICS.device(KeyAdvert, "dev-1"), advert.to_bytes(), Reason.CLIENT_MISMATCH),  # dev-0's advert on dev-1's topic
        (TOPICS.device(KeyAdvert, "zz-9"), stranger.to_bytes(), Reason.NOT_IN_ROUND),
        (TOPICS.device(KeyAdvert, "dev-2"), other_session.to_bytes(), Reason.WRONG_SESSION),
        (TOPICS.device(MaskedInput, "dev-3"), masked_early.to_bytes(), Reason.WRONG_PHASE),
        (TOPICS.device(MaskedInput, "dev-3"), b"\x80" * (4 * setup.length + 8192), Reason.TOO_LARGE),
        (TOPICS.device(KeyAdvert, "dev-4"), KeyAdvert(FLEET, 1, setup.session, "dev-4", b"\x00" * 32, b"\x01" * 32).to_bytes(),
         Reason.UNAUTHENTIC),  # low-order public keys
    ]
    for topic, payload, reason in cases:
        (refused,) = await h.send(topic, payload)
        assert refused.reason is reason, (topic, refused)
        receipt = refused.receipt(FLEET, model_version=0)
        assert receipt.status is ReceiptStatus.REJECTED and receipt.reason.startswith(f"{reason.value}: ")
    assert h.spool == [] and h.relay.phase is Phase.ADVERTISE and len(h.relay.waiting_for()) == 5

    await h.run()
    outcome = h.relay.outcome
    assert isinstance(outcome, SecureMean) and np.array_equal(outcome.aggregate.total, _expected(h))
    assert sorted(s[1] for s in h.spool) == h.clients and {s[0] for s in h.spool} == {setup.session}  # each spooled once
    assert h.transport.retained == {}  # everything retained was cleared at the end
    assert [c["server"]["phase"] for c in h.checkpoints] == ["advertise", "share", "mask", "unmask", "done"]


async def test_hostile_chunked_inputs_are_refused_and_their_chunks_cleared() -> None:
    h = Harness()
    setup = await h.start()
    for client, device in h.devices.items():
        await h.deliver(client, device.advertisement())
    for client, device in h.devices.items():
        await h.deliver(client, device.handle(KeyList.from_bytes(h.transport.retained[TOPICS.keys(client)])))
    assert h.relay.phase is Phase.MASK
    for client, device in h.devices.items():
        assert device.handle(ShareBundle.from_bytes(h.transport.retained[TOPICS.bundle(client)])) is None
    masked = {c: d.submit(h.inputs[c]) for c, d in h.devices.items()}
    payload = masked["dev-0"].to_bytes()  # type: ignore[union-attr]

    def manifest(client: str, session: str) -> Manifest:
        return Manifest.of(payload, fleet=FLEET, kind="update", chunk_size=40, client_id=client, update_id=session)

    topic = TOPICS.device(MaskedInput, "dev-0")
    (refused,) = await h.send(topic, manifest("dev-1", setup.session).to_bytes())
    assert refused.reason is Reason.CLIENT_MISMATCH
    (refused,) = await h.send(topic, manifest("dev-0", "old-session").to_bytes())
    assert refused.reason is Reason.WRONG_SESSION
    good = manifest("dev-0", setup.session)
    assert await h.send(topic, good.to_bytes()) == []
    base = TOPICS.masked_chunks("dev-0", setup.session)
    assert h.transport.subscribed == [f"{base}/+"]
    assert await h.send(f"{base}/0", payload[:40]) == []
    (refused,) = await h.send(f"{base}/1", b"x" * 40)  # not the chunk the manifest lists
    assert refused.reason is Reason.BAD_CHUNK and refused.client_id == "dev-0"
    assert h.transport.unsubscribed == [f"{base}/+"]
    assert {(t, p) for t, p, r in h.transport.published if t.startswith(base)} == {(f"{base}/{i}", b"") for i in range(good.count)}

    assert await h.send(topic, good.to_bytes()) == []  # sent again: fetched again; this time it stalls
    h.now = h.relay.next_wake() or 0.0
    assert h.now == pytest.approx(h.relay.settings.chunk_timeout)
    (refused,) = await h.relay.on_wake(now=h.now)
    assert refused.reason is Reason.INCOMPLETE
    assert h.spool == [] and h.relay.phase is Phase.MASK  # nothing half-received was spooled or counted

    short = MaskedInput(FLEET, 1, setup.session, "dev-1", 32, setup.length - 1, bytes(4 * (setup.length - 1)))
    (refused,) = await h.deliver("dev-1", short)
    assert refused.reason is Reason.SHAPE_MISMATCH and h.spool == []
    for client, message in masked.items():
        assert await h.deliver(client, message) == []
    assert await h.deliver("dev-1", masked["dev-1"]) == []  # a resend: no refusal, not spooled twice
    assert len(h.spool) == 5 and h.relay.phase is Phase.UNMASK
    request = UnmaskRequest.from_bytes(h.transport.retained[TOPICS.unmask])
    for client, device in h.devices.items():
        await h.deliver(client, device.handle(request))
    outcome = h.relay.outcome
    assert isinstance(outcome, SecureMean) and np.array_equal(outcome.aggregate.total, _expected(h))


async def test_a_session_with_too_few_answers_is_abandoned_at_its_deadline_and_can_be_retried() -> None:
    h = Harness()
    first = await h.start()
    for client in h.clients[:2]:
        await h.deliver(client, h.devices[client].advertisement())
    h.now = h.relay.next_wake() or 0.0
    assert await h.relay.on_wake(now=h.now) == []
    assert isinstance(h.relay.outcome, Abandoned) and h.relay.outcome.reason is Reason.BELOW_THRESHOLD
    assert h.transport.retained == {}
    second = await h.start()
    assert second.session != first.session and h.relay.outcome is None
    with pytest.raises(RuntimeError, match="still running"):
        await h.relay.start(1, h.clients, now=h.now)


def test_the_configuration_check_names_every_refused_combination() -> None:
    assert refusals() == []
    check_compatible(mode="sync", aggregation="mean", codec="none")
    found = refusals(mode="async", aggregation="krum", codec="flat+topk:0.01+q4+zstd", clip_factor=3.0, clip_action="reject", workers=2)
    assert len(found) == 6
    for option in ("--mode sync", "--aggregation krum", "codec must be 'none'", "--clip-norm auto", "--clip-action reject", "--workers 2"):
        assert any(option in line for line in found), option
    for rule in ("median", "trimmed_mean", "krum"):
        with pytest.raises(SecureAggregationUnsupported, match=f"cannot run --aggregation {rule}"):
            check_compatible(aggregation=rule)
    for codec in ("topk:0.05", "q8", "zstd"):
        with pytest.raises(SecureAggregationUnsupported, match="must be 'none'"):
            check_compatible(codec=codec)


def test_settings_refuse_what_the_devices_would_refuse() -> None:
    with pytest.raises(ValueError):
        SecAggSettings(max_weight=0)
    with pytest.raises(ValueError):
        SecAggSettings(chunk_timeout=0)
    with pytest.raises(ValueError):
        SecAggSettings().setup(FLEET, 1, ["a", "b"], 10, "s")  # two devices: each would learn the other's input

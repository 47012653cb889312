"""Hostile input in every protocol message is refused with a reason, and the refusing side's state is
unchanged: after the refusals, the honest message is still taken and the session ends with the exact sum.

The device under attack is held back by the relay (its messages wait in the relay's inbox), so the test
hands it the real message altered, then the real one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedge_contract.errors import Reason
from fedge_contract.secagg import (
    Abandoned,
    Aggregate,
    DevicePolicy,
    DeviceSession,
    KeyList,
    MaskedInput,
    Phase,
    ProtocolError,
    Reveal,
    Setup,
    ShareBundle,
    Shares,
    UnmaskRequest,
)
from fedge_contract.secagg.messages import PeerKeys, RevealedShare, SealedShare
from fedge_contract.secagg.shamir import PRIME
from tests.contract.secagg.relay import Dropouts, Relay, make_setup, random_inputs, ring_sum

TARGET = "agent-004"
LOW_ORDER = bytes(32)


def _relay(**kw: Any) -> Relay:
    setup = make_setup(12, degree=6, threshold=4, min_survivors=4, length=8)
    return Relay(setup, random_inputs(setup), held=frozenset({TARGET}), **kw)


def _refused(call: Callable[[], object], reason: Reason) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        call()
    assert refused.value.reason is reason, refused.value
    return refused.value


def _finish(relay: Relay) -> None:
    """Release the held device, resend what the current phase sent (as after a reconnect), run to the end."""
    relay.held = frozenset()
    for message in relay.server.pending():
        relay.in_flight += relay.to_devices(message)
    outcome = relay.run()
    assert isinstance(outcome, Aggregate), outcome
    assert np.array_equal(outcome.total, ring_sum(relay.setup, relay.inputs, outcome.survivors))
    assert TARGET in outcome.survivors


def _answer(relay: Relay, kind: type[Any]) -> Any:
    """Hand the held device its real message of ``kind``; send its answer on."""
    device = relay.devices[TARGET]
    reply = device.handle(relay.last_to(TARGET, kind))
    if reply is None and kind is ShareBundle:
        reply = device.submit(relay.inputs[TARGET])
    assert reply is not None
    relay.in_flight.append(reply)
    return reply


def _held_until(relay: Relay, phase: Phase) -> Any:
    """Run the session to ``phase``, the held device answering the earlier phases honestly; what ``phase`` sent it."""
    for reached, kind in ((Phase.SHARE, KeyList), (Phase.MASK, ShareBundle), (Phase.UNMASK, UnmaskRequest)):
        relay.run_until(reached)
        if reached is phase:
            message = relay.last_to(TARGET, kind)
            assert isinstance(message, kind)
            return message
        _answer(relay, kind)
    raise AssertionError(f"no message to the held device in {phase}")


# ---------------------------------------------------------------- the device refuses


def test_a_device_refuses_a_setup_that_does_not_invite_it_or_is_unsafe() -> None:
    setup = make_setup(12, degree=6, threshold=4, min_survivors=4)
    _refused(lambda: DeviceSession(setup, "agent-999"), Reason.NOT_IN_ROUND)
    _refused(lambda: DeviceSession(setup, TARGET, policy=DevicePolicy(min_survivors=5)), Reason.UNSAFE_REQUEST)
    device = DeviceSession(setup, TARGET)
    assert device.handle(setup) == device.advertisement()  # a resent setup: the same keys again
    _refused(lambda: device.handle(dataclasses.replace(setup, clip=1.0)), Reason.CONFLICT)
    _refused(lambda: device.handle(make_setup(12, degree=6, threshold=4, min_survivors=4, seed=5)), Reason.WRONG_SESSION)


def _key_list_attacks(kl: KeyList, setup: Setup) -> list[tuple[str, KeyList, Reason]]:
    peers = list(kl.peers)
    outsider = next(m for m in kl.members if m not in {p.client_id for p in peers} and m != TARGET)
    swapped_seed = bytes(32) if kl.graph_seed != bytes(32) else b"\x01" * 32
    return [
        ("addressed to another", dataclasses.replace(kl, recipient="agent-000"), Reason.WRONG_RECIPIENT),
        ("another round", dataclasses.replace(kl, round=kl.round + 1), Reason.WRONG_SESSION),
        ("from another sender", dataclasses.replace(kl, sender="mallory"), Reason.WRONG_SESSION),
        ("a member outside the cohort", dataclasses.replace(kl, members=tuple(sorted((*kl.members, "zz-stranger")))), Reason.NOT_IN_ROUND),
        ("without this device", dataclasses.replace(kl, members=tuple(m for m in kl.members if m != TARGET)), Reason.NOT_IN_ROUND),
        ("too few members", dataclasses.replace(kl, members=tuple(sorted({TARGET, *kl.members[:2]}))), Reason.BELOW_THRESHOLD),
        ("a neighbour missing", dataclasses.replace(kl, peers=tuple(peers[1:])), Reason.GRAPH_MISMATCH),
        ("a stranger's keys added",
         dataclasses.replace(kl, peers=tuple(sorted([*peers, PeerKeys(outsider, b"\x09" * 32, b"\x08" * 32)], key=lambda p: p.client_id))),
         Reason.GRAPH_MISMATCH),
        ("another graph seed", dataclasses.replace(kl, graph_seed=swapped_seed), Reason.GRAPH_MISMATCH),
        ("a repeated public key", dataclasses.replace(kl, peers=(dataclasses.replace(peers[0], cipher_key=peers[1].cipher_key), *peers[1:])),
         Reason.CONFLICT),
        ("a low-order key", dataclasses.replace(kl, peers=(dataclasses.replace(peers[0], mask_key=LOW_ORDER), *peers[1:])), Reason.UNAUTHENTIC),
    ]


ATTACK_NAMES = [name for name, _, _ in _key_list_attacks(
    KeyList(fleet="f", round=1, session="s", sender="a", recipient=TARGET, members=tuple(f"agent-{i:03d}" for i in range(12)),
            graph_seed=bytes(32), peers=tuple(PeerKeys(f"agent-{i:03d}", bytes([i]) * 32, bytes([i + 50]) * 32) for i in (0, 1, 2))),
    make_setup(12),
)]


@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_a_device_refuses_a_hostile_key_list(attack: str) -> None:
    relay = _relay()
    real = _held_until(relay, Phase.SHARE)
    _, hostile, reason = next(a for a in _key_list_attacks(real, relay.setup) if a[0] == attack)
    _refused(lambda: relay.devices[TARGET].handle(hostile), reason)
    shares = _answer(relay, KeyList)
    assert relay.devices[TARGET].handle(real) == shares  # the real one, resent: the same answer
    _refused(lambda: relay.devices[TARGET].handle(hostile), Reason.WRONG_RECIPIENT if attack == "addressed to another" else
             Reason.WRONG_SESSION if attack in ("another round", "from another sender") else Reason.CONFLICT)
    _finish(relay)


@pytest.mark.parametrize(
    ("threshold", "policy"),
    [(3, DevicePolicy(require_majority=True)), (2, DevicePolicy()), (4, DevicePolicy(min_threshold_fraction=0.7))],
)
def test_a_device_refuses_a_threshold_its_policy_does_not_accept(threshold: int, policy: DevicePolicy) -> None:
    """3 of 6 neighbours is no majority; 2 of 6 is below the default 40%; 4 of 6 below a stricter 70%."""
    setup = make_setup(12, degree=6, threshold=threshold, min_survivors=4)
    lenient = Relay(setup, random_inputs(setup), policy=DevicePolicy(min_threshold_fraction=0.0), held=frozenset({TARGET}))
    lenient.run_until(Phase.SHARE)
    strict = DeviceSession(setup, TARGET, policy=policy)  # the same device with a stricter policy
    _refused(lambda: strict.handle(lenient.last_to(TARGET, KeyList)), Reason.UNSAFE_REQUEST)
    _finish(lenient)


def _bundle_attacks(real: ShareBundle, other: ShareBundle, outsider: str) -> dict[str, tuple[ShareBundle, Reason]]:
    boxes = list(real.boxes)
    tampered = bytearray(boxes[0].box)
    tampered[-1] ^= 1
    foreign = next(b for b in other.boxes if b.peer != TARGET)
    relabelled = SealedShare(boxes[1].peer, boxes[0].box)
    return {
        "addressed to another": (dataclasses.replace(real, recipient=other.recipient), Reason.WRONG_RECIPIENT),
        "a box from a non-neighbour": (
            dataclasses.replace(real, boxes=tuple(sorted([*boxes[1:], SealedShare(outsider, boxes[0].box)], key=lambda b: b.peer))),
            Reason.GRAPH_MISMATCH,
        ),
        "too few boxes": (dataclasses.replace(real, boxes=tuple(boxes[:3])), Reason.BELOW_THRESHOLD),
        "a tampered box": (dataclasses.replace(real, boxes=(SealedShare(boxes[0].peer, bytes(tampered)), *boxes[1:])), Reason.UNAUTHENTIC),
        "a box relabelled as another neighbour's": (dataclasses.replace(real, boxes=(boxes[0], relabelled, *boxes[2:])), Reason.UNAUTHENTIC),
        "a box sealed for another device": (
            dataclasses.replace(real, boxes=tuple(SealedShare(b.peer, foreign.box) if b.peer == foreign.peer else b for b in boxes)),
            Reason.UNAUTHENTIC,
        ),
    }


BUNDLE_ATTACKS = ["addressed to another", "a box from a non-neighbour", "too few boxes", "a tampered box",
                  "a box relabelled as another neighbour's", "a box sealed for another device"]


@pytest.mark.parametrize("attack", BUNDLE_ATTACKS)
def test_a_device_refuses_a_hostile_bundle(attack: str) -> None:
    relay = _relay()
    real = _held_until(relay, Phase.MASK)
    graph = relay.server._require_graph()
    neighbours = graph.neighbours(TARGET)
    # a bundle of a device that shares a neighbour with the target: that neighbour sealed a box for both
    other_client = next(v for v in relay.setup.cohort if v != TARGET and v not in neighbours and graph.neighbours(v) & neighbours)
    other = relay.server._bundle(other_client)
    outsider = next(v for v in relay.setup.cohort if v != TARGET and v not in neighbours)
    hostile, reason = _bundle_attacks(real, other, outsider)[attack]
    _refused(lambda: relay.devices[TARGET].handle(hostile), reason)
    _answer(relay, ShareBundle)
    _finish(relay)


def test_a_device_refuses_a_bundle_before_its_key_list_and_a_second_different_one() -> None:
    relay = _relay()
    bundle = _held_until(relay, Phase.MASK)
    fresh = DeviceSession(relay.setup, TARGET)
    _refused(lambda: fresh.handle(bundle), Reason.WRONG_PHASE)
    masked = _answer(relay, ShareBundle)
    assert relay.devices[TARGET].handle(bundle) == masked
    _refused(lambda: relay.devices[TARGET].handle(dataclasses.replace(bundle, boxes=bundle.boxes[1:])), Reason.CONFLICT)
    _finish(relay)


def _unmask_attacks(real: UnmaskRequest, partner: str) -> dict[str, tuple[UnmaskRequest, Reason]]:
    survivors, dropped = list(real.survivors), list(real.dropped)
    return {
        "a peer both survived and dropped": (dataclasses.replace(real, dropped=tuple(sorted({*dropped, partner}))), Reason.UNSAFE_REQUEST),
        "this device listed as dropped": (
            dataclasses.replace(real, survivors=tuple(s for s in survivors if s != TARGET), dropped=tuple(sorted({*dropped, TARGET}))),
            Reason.UNSAFE_REQUEST,
        ),
        "this device missing": (dataclasses.replace(real, survivors=tuple(s for s in survivors if s != TARGET)), Reason.UNSAFE_REQUEST),
        "a partner not classified": (dataclasses.replace(real, survivors=tuple(s for s in survivors if s != partner)), Reason.UNSAFE_REQUEST),
        "too few survivors": (dataclasses.replace(real, survivors=tuple(sorted({TARGET, partner})), dropped=()), Reason.BELOW_THRESHOLD),
        "a device that is no member": (dataclasses.replace(real, dropped=tuple(sorted({*dropped, "zz-stranger"}))), Reason.NOT_IN_ROUND),
    }


@pytest.mark.parametrize("attack", ["a peer both survived and dropped", "this device listed as dropped", "this device missing",
                                    "a partner not classified", "too few survivors", "a device that is no member"])
def test_a_device_refuses_a_hostile_unmask_request(attack: str) -> None:
    relay = _relay()
    real = _held_until(relay, Phase.UNMASK)
    partner = min(relay.devices[TARGET]._held)
    hostile, reason = _unmask_attacks(real, partner)[attack]
    _refused(lambda: relay.devices[TARGET].handle(hostile), reason)
    reveal = _answer(relay, UnmaskRequest)
    assert relay.devices[TARGET].handle(real) == reveal
    _refused(lambda: relay.devices[TARGET].handle(hostile), Reason.CONFLICT)  # one answer per session
    _finish(relay)


def test_a_device_refuses_an_unmask_request_before_its_masked_input() -> None:
    relay = _relay()
    _held_until(relay, Phase.MASK)
    request = UnmaskRequest(fleet=relay.setup.fleet, round=relay.setup.round, session=relay.setup.session,
                            sender=relay.setup.sender, survivors=relay.setup.cohort, dropped=())
    _refused(lambda: relay.devices[TARGET].handle(request), Reason.WRONG_PHASE)


# ---------------------------------------------------------------- the server refuses


def _server_refuses(relay: Relay, message: Any, reason: Reason) -> None:
    before = relay.server.snapshot()
    _refused(lambda: relay.server.handle(message, now=relay.now), reason)
    assert relay.server.snapshot() == before


def test_the_server_refuses_hostile_adverts() -> None:
    relay = _relay(dropouts=Dropouts(before_keys=frozenset({"agent-011"})))
    relay.step()  # every advert but agent-011's is in
    advert = relay.devices["agent-000"].advertisement()
    late = relay.devices["agent-011"].advertisement()
    assert not relay.server.handle(advert, now=0.0).accepted  # an identical resend: taken once, no error
    _server_refuses(relay, dataclasses.replace(advert, sender="agent-999"), Reason.NOT_IN_ROUND)
    _server_refuses(relay, dataclasses.replace(advert, session="other"), Reason.WRONG_SESSION)
    _server_refuses(relay, dataclasses.replace(advert, round=advert.round - 1), Reason.WRONG_SESSION)
    _server_refuses(relay, dataclasses.replace(advert, fleet="other"), Reason.WRONG_SESSION)
    _server_refuses(relay, dataclasses.replace(advert, mask_key=b"\x07" * 32), Reason.CONFLICT)
    _server_refuses(relay, dataclasses.replace(late, cipher_key=advert.cipher_key), Reason.CONFLICT)  # someone else's key
    _server_refuses(relay, dataclasses.replace(late, mask_key=late.cipher_key), Reason.CONFLICT)
    _server_refuses(relay, dataclasses.replace(late, mask_key=LOW_ORDER), Reason.UNAUTHENTIC)
    relay.step()  # the deadline passes: agent-011 is out
    _server_refuses(relay, late, Reason.WRONG_PHASE)
    _finish(relay)


def test_the_server_refuses_hostile_shares() -> None:
    relay = _relay(dropouts=Dropouts(before_keys=frozenset({"agent-011"})))
    shares = relay.devices[TARGET].handle(_held_until(relay, Phase.SHARE))
    assert isinstance(shares, Shares)
    boxes = list(shares.boxes)
    _server_refuses(relay, dataclasses.replace(shares, boxes=tuple(boxes[1:])), Reason.GRAPH_MISMATCH)
    outsider = next(v for v in relay.server.members if v != TARGET and v not in {b.peer for b in boxes})
    relabelled = tuple(sorted([SealedShare(outsider, boxes[0].box), *boxes[1:]], key=lambda b: b.peer))
    _server_refuses(relay, dataclasses.replace(shares, boxes=relabelled), Reason.GRAPH_MISMATCH)
    _server_refuses(relay, dataclasses.replace(shares, sender="agent-011"), Reason.NOT_IN_ROUND)  # it did not advertise
    assert not relay.server.handle(relay.devices[TARGET].advertisement(), now=relay.now).accepted  # a late resend of the advert
    relay.in_flight.append(shares)
    relay.step()
    _server_refuses(relay, dataclasses.replace(shares, seed_commitment=bytes(32)), Reason.CONFLICT)


def _to_mask_phase(relay: Relay) -> MaskedInput:
    device = relay.devices[TARGET]
    device.handle(_held_until(relay, Phase.MASK))
    masked = device.submit(relay.inputs[TARGET])
    assert isinstance(masked, MaskedInput)
    return masked


def test_the_server_refuses_hostile_masked_inputs_and_counts_a_resend_once() -> None:
    relay = _relay(dropouts=Dropouts(after_keys=frozenset({"agent-011"})))
    early = _relay()
    early.run_until(Phase.SHARE)
    premature = MaskedInput(fleet=early.setup.fleet, round=early.setup.round, session=early.setup.session, sender="agent-000",
                            bits=32, length=8, data=bytes(32))
    _server_refuses(early, premature, Reason.WRONG_PHASE)
    masked = _to_mask_phase(relay)
    _server_refuses(relay, dataclasses.replace(masked, sender="agent-011"), Reason.NOT_IN_ROUND)  # dropped before sharing
    _server_refuses(relay, MaskedInput(fleet=masked.fleet, round=masked.round, session=masked.session, sender=TARGET,
                                       bits=32, length=7, data=masked.data[:28]), Reason.SHAPE_MISMATCH)
    _server_refuses(relay, MaskedInput(fleet=masked.fleet, round=masked.round, session=masked.session, sender=TARGET,
                                       bits=16, length=16, data=masked.data), Reason.SHAPE_MISMATCH)
    assert relay.server.handle(masked, now=relay.now).accepted
    assert not relay.server.handle(masked, now=relay.now).accepted  # QoS 1 redelivery
    _server_refuses(relay, dataclasses.replace(masked, data=bytes(len(masked.data))), Reason.CONFLICT)
    _finish(relay)


def _to_unmask_phase(relay: Relay) -> Reveal:
    masked = _to_mask_phase(relay)  # (before relay.in_flight is read: stepping replaces the list)
    relay.in_flight.append(masked)
    relay.run_until(Phase.UNMASK)
    reveal = relay.devices[TARGET].handle(relay.last_to(TARGET, UnmaskRequest))
    assert isinstance(reveal, Reveal)
    return reveal


def test_the_server_refuses_hostile_reveals() -> None:
    relay = _relay(dropouts=Dropouts(after_shares=frozenset({"agent-005"}), after_masked=frozenset({"agent-003"})))
    reveal = _to_unmask_phase(relay)
    assert reveal.keys, "the target should hold a share of a dropped neighbour's key"
    _server_refuses(relay, dataclasses.replace(reveal, seeds=reveal.seeds[1:]), Reason.GRAPH_MISMATCH)
    # a share of a survivor's mask key: the one thing that would unmask it; the server will not even store it
    survivor_key = RevealedShare(reveal.seeds[0].peer, reveal.seeds[0].share)
    _server_refuses(relay, dataclasses.replace(reveal, keys=tuple(sorted([*reveal.keys, survivor_key], key=lambda r: r.peer))), Reason.GRAPH_MISMATCH)
    _server_refuses(relay, dataclasses.replace(reveal, keys=(RevealedShare(reveal.keys[0].peer, PRIME.to_bytes(33, "big")), *reveal.keys[1:])),
                    Reason.BAD_SHARE)
    _server_refuses(relay, dataclasses.replace(reveal, sender="agent-005"), Reason.NOT_IN_ROUND)
    assert relay.server.handle(reveal, now=relay.now).accepted
    forged = dataclasses.replace(reveal, seeds=(RevealedShare(reveal.seeds[0].peer, (1).to_bytes(33, "big")), *reveal.seeds[1:]))
    _server_refuses(relay, forged, Reason.CONFLICT)
    _finish(relay)


def test_a_wrong_share_from_a_hostile_device_abandons_the_session_instead_of_a_wrong_sum() -> None:
    """A well-formed share with a wrong value: the rebuilt seed fails its commitment. Nothing is output."""
    relay = _relay()
    reveal = _to_unmask_phase(relay)
    victim = reveal.seeds[0].peer
    forged = dataclasses.replace(reveal, seeds=(RevealedShare(victim, (12345).to_bytes(33, "big")), *reveal.seeds[1:]))
    assert relay.server.handle(forged, now=relay.now).accepted
    relay.held = frozenset()
    outcome = relay.run()
    assert isinstance(outcome, Abandoned) and outcome.reason is Reason.BAD_SHARE and outcome.phase is Phase.UNMASK


def test_a_wrong_commitment_abandons_the_session() -> None:
    relay = _relay()
    shares = relay.devices[TARGET].handle(_held_until(relay, Phase.SHARE))
    assert isinstance(shares, Shares)
    relay.in_flight.append(dataclasses.replace(shares, seed_commitment=bytes(32)))
    relay.run_until(Phase.MASK)
    device = relay.devices[TARGET]
    device.handle(relay.last_to(TARGET, ShareBundle))
    masked = device.submit(relay.inputs[TARGET])
    assert masked is not None
    relay.in_flight.append(masked)
    relay.run_until(Phase.UNMASK)
    reveal = device.handle(relay.last_to(TARGET, UnmaskRequest))
    assert isinstance(reveal, Reveal)
    relay.in_flight.append(reveal)
    outcome = relay.run()
    assert isinstance(outcome, Abandoned) and outcome.reason is Reason.BAD_SHARE and TARGET in outcome.detail

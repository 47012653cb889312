"""A device's side: accept, refuse with a reason (keeping its model), plan and run a catch-up, persist."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import numpy as np
import pytest

from fedge_contract.broadcast import BroadcastEncoder, BroadcastPolicy, CatchUp, GlobalDelta, Rebuilder
from fedge_contract.codecs import EncodedTensor
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import GlobalModel
from tests.contract.broadcast.helpers import FLEET, MAX, SPEC, TOPICS, Retained, follow, initial, same_bits, walk


def fleet(versions: int, policy: BroadcastPolicy | None = None) -> tuple[BroadcastEncoder, Retained, list[bytes]]:
    """An encoder run for ``versions`` versions, its retained topics, and every announcement it made."""
    rng, true = np.random.default_rng(0), initial()
    encoder = BroadcastEncoder(SPEC, policy or BroadcastPolicy(chain="flat+topk:0.3+q8+zstd", every=4, ratio=None))
    broker = Retained()
    payloads = [broker.publish(encoder.begin(true, 0, devices_hold=True))]
    for version in range(1, versions + 1):
        true = walk(true, rng)
        payloads.append(broker.publish(encoder.advance(true, version)))
    return encoder, broker, payloads


def announced(payload: bytes) -> GlobalDelta:
    return GlobalDelta.from_bytes(payload, max_bytes=MAX, fleet=FLEET)


def refused(device: Rebuilder, message: GlobalDelta | GlobalModel) -> Reason:
    before = device.held
    with pytest.raises(DecodeError) as caught:
        device.accept(message)
    assert device.held is before  # a refusal leaves the held model as it was
    return caught.value.reason


def test_a_device_that_follows_every_version_accepts_each_delta() -> None:
    encoder, _, payloads = fleet(6)
    device = Rebuilder.from_build(SPEC, initial())
    for payload in payloads:
        held = device.accept(announced(payload))
    assert held.version == 6 and held.digest == encoder.held_hash and same_bits(dict(held.weights), dict(encoder.held))
    assert device.accept(announced(payloads[-1])) is held  # a re-announcement changes nothing


def test_refusals_name_their_reason_and_keep_the_held_model() -> None:
    _, _, payloads = fleet(3)
    device = Rebuilder.from_build(SPEC, initial())
    device.accept(announced(payloads[0]))
    gap = announced(payloads[2])
    assert refused(device, gap) is Reason.BASE_MISMATCH
    delta = announced(payloads[1])
    assert refused(device, replace(delta, held_hash=b"\0" * 16)) is Reason.HASH_MISMATCH
    assert refused(device, replace(delta, fingerprint="0" * 16)) is Reason.FINGERPRINT
    tensor = delta.tensors[0]
    bad = EncodedTensor(tensor.name, tensor.dtype, tensor.shape, "q9+zstd", tensor.data)
    assert refused(device, replace(delta, tensors=(bad,))) is Reason.CODEC
    cut = EncodedTensor(tensor.name, tensor.dtype, tensor.shape, tensor.codec, tensor.data[:-3])
    assert refused(device, replace(delta, tensors=(cut,))) is Reason.BAD_TENSOR
    assert refused(Rebuilder(SPEC), delta) is Reason.BASE_MISMATCH  # nothing held yet
    assert device.accept(delta).version == 1  # and the good one still applies


def test_a_device_whose_own_build_differs_is_told_by_the_first_hash() -> None:
    _, broker, payloads = fleet(0)
    device = Rebuilder.from_build(SPEC, {k: v + np.float32(1e-6) for k, v in initial().items()})
    assert refused(device, announced(payloads[0])) is Reason.HASH_MISMATCH
    assert follow(device, payloads[0], broker)[0] == "caught-up from the keyframe"


def test_plans() -> None:
    _, _, payloads = fleet(6)  # keyframes (snapshots) at 0 and 4: deltas 5 and 6 retained
    latest = announced(payloads[6])
    assert latest.keyframe_version == 4
    device = Rebuilder.from_build(SPEC, initial())
    for payload in payloads[:5]:
        device.accept(announced(payload))
    assert device.plan(latest) == CatchUp(None, (5,))  # holds v4 >= the keyframe: the retained delta is enough
    assert device.plan(latest, trust_held=False) == CatchUp(4, (5,))
    assert Rebuilder(SPEC).plan(latest) == CatchUp(4, (5,))
    old = Rebuilder.from_build(SPEC, initial())
    assert old.plan(latest) == CatchUp(4, (5,))  # holds v0, before the keyframe
    assert CatchUp(4, (5,)).topics(TOPICS) == ["fl/f1/global/key", "fl/f1/global/delta/5"]
    full = GlobalModel(FLEET, 4, 5, None, latest.task, SPEC.fingerprint, ())
    assert not device.plan(full).needed


def test_recovery_goes_from_deltas_to_the_keyframe_to_giving_up() -> None:
    _, _, payloads = fleet(6)
    latest = announced(payloads[6])
    device = Rebuilder.from_build(SPEC, initial())
    for payload in payloads[:5]:
        device.accept(announced(payload))
    gap, mismatch = DecodeError(Reason.BASE_MISMATCH, "gap"), DecodeError(Reason.HASH_MISMATCH, "hash")
    assert device.recovery(latest, gap) == CatchUp(None, (5,))
    assert device.recovery(latest, mismatch) == CatchUp(4, (5,))
    assert device.recovery(latest, mismatch, CatchUp(None, (5,))) == CatchUp(4, (5,))
    assert device.recovery(latest, mismatch, CatchUp(4, (5,))) is None
    assert device.recovery(GlobalModel(FLEET, 6, 7, None, latest.task, SPEC.fingerprint, ()), mismatch) is None


def test_catch_up_from_the_keyframe_or_from_retained_deltas() -> None:
    encoder, broker, payloads = fleet(6)
    latest = announced(payloads[6])
    keyframe = GlobalModel.from_bytes(broker.topics[TOPICS.global_keyframe], max_bytes=MAX, fleet=FLEET)
    deltas = {5: announced(broker.topics[TOPICS.global_delta(5)])}
    fresh = Rebuilder(SPEC)
    held = fresh.catch_up(latest, CatchUp(4, (5,)), keyframe, deltas)
    assert held.version == 6 and held.digest == encoder.held_hash and same_bits(dict(held.weights), dict(encoder.held))
    lagging = Rebuilder.from_build(SPEC, initial())
    for payload in payloads[:5]:
        lagging.accept(announced(payload))
    assert lagging.catch_up(latest, CatchUp(None, (5,)), None, deltas).digest == encoder.held_hash


def test_catch_up_refusals_keep_the_held_model() -> None:
    _, broker, payloads = fleet(6)
    latest = announced(payloads[6])
    keyframe = GlobalModel.from_bytes(broker.topics[TOPICS.global_keyframe], max_bytes=MAX, fleet=FLEET)
    deltas = {5: announced(broker.topics[TOPICS.global_delta(5)])}
    device = Rebuilder.from_build(SPEC, initial())
    before = device.held
    cases = [
        (CatchUp(4, (5,)), None, deltas, Reason.INCOMPLETE),  # the keyframe did not come
        (CatchUp(4, (5,)), keyframe, {}, Reason.INCOMPLETE),  # a retained delta did not come
        (CatchUp(3, (4, 5)), keyframe, deltas, Reason.BAD_VALUE),  # global/key moved on meanwhile
        (CatchUp(4, (5,)), replace(keyframe, held_hash=None), deltas, Reason.MISSING_FIELD),
        (CatchUp(4, (5,)), replace(keyframe, held_hash=b"\1" * 16), deltas, Reason.HASH_MISMATCH),
        (CatchUp(4, (5,)), keyframe, {5: announced(payloads[4])}, Reason.BAD_VALUE),  # the wrong delta on a topic
        (CatchUp(4, (5,)), keyframe, {5: replace(deltas[5], held_hash=b"\1" * 16)}, Reason.HASH_MISMATCH),
        (CatchUp(None, (1, 2, 3, 4, 5)), None, deltas, Reason.INCOMPLETE),
    ]
    for plan, frame, found, reason in cases:
        with pytest.raises(DecodeError) as caught:
            device.catch_up(latest, plan, frame, found)
        assert caught.value.reason is reason, plan
        assert device.held is before


def test_held_state_round_trips_and_refuses_corruption() -> None:
    encoder, _, payloads = fleet(3)
    device = Rebuilder.from_build(SPEC, initial())
    for payload in payloads:
        device.accept(announced(payload))
    state = msgpack.unpackb(msgpack.packb(device.to_state(), use_bin_type=True), raw=False)
    restored = Rebuilder.from_state(state, SPEC)
    assert restored.held is not None and restored.held.version == 3 and restored.held.digest == encoder.held_hash
    assert same_bits(dict(restored.held.weights), dict(encoder.held))
    assert Rebuilder.from_state(None, SPEC).held is None and Rebuilder(SPEC).to_state() is None
    for key, value, reason in [("held_hash", b"\0" * 16, Reason.HASH_MISMATCH), ("fingerprint", "x", Reason.FINGERPRINT),
                               ("format", 9, Reason.SCHEMA), ("held", b"\0" * 8, Reason.BAD_TENSOR)]:
        with pytest.raises(DecodeError) as caught:
            Rebuilder.from_state({**state, key: value}, SPEC)
        assert caught.value.reason is reason

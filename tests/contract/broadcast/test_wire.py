"""GlobalDelta: one encoder, one strict decoder; old receivers refuse it; full GlobalModels are unchanged."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedge_contract import SCHEMA_VERSION, DecodeError, GlobalModel, Reason, TaskConfig
from fedge_contract.broadcast import GlobalDelta, decode_announcement
from fedge_contract.codecs import encode_weights, parse_chain
from tests.contract.broadcast.helpers import FLEET, MAX, SPEC, initial

HASH = bytes(range(16))


def delta_message(**overrides: Any) -> GlobalDelta:
    fields: dict[str, Any] = {
        "fleet": FLEET, "model_version": 5, "base_version": 4, "round": 6, "deadline": 1_700_000_000.25, "task": TaskConfig(lr=0.5),
        "fingerprint": SPEC.fingerprint, "held_hash": HASH, "keyframe_version": 2,
        "tensors": encode_weights(initial(), parse_chain("flat+topk:0.1+q8+zstd"), np.random.default_rng(0)),
    }
    return GlobalDelta(**{**fields, **overrides})


def wire(**overrides: Any) -> bytes:
    obj = msgpack.unpackb(delta_message().to_bytes(), raw=False)
    for key, value in overrides.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def refusal(payload: bytes) -> Reason:
    with pytest.raises(DecodeError) as caught:
        GlobalDelta.from_bytes(payload, max_bytes=MAX, fleet=FLEET)
    return caught.value.reason


def test_round_trip_and_hold() -> None:
    message = delta_message(final=True)
    assert GlobalDelta.from_bytes(message.to_bytes(), max_bytes=MAX, fleet=FLEET) == message
    hold = delta_message(model_version=0, base_version=0, keyframe_version=0, tensors=())
    assert hold.is_hold and GlobalDelta.from_bytes(hold.to_bytes(), max_bytes=MAX) == hold


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"schema": SCHEMA_VERSION + 1}, Reason.SCHEMA),
        ({"type": "global"}, Reason.WRONG_TYPE),
        ({"fleet": "other"}, Reason.WRONG_FLEET),
        ({"base_version": ...}, Reason.MISSING_FIELD),
        ({"held_hash": ...}, Reason.MISSING_FIELD),
        ({"keyframe_version": ...}, Reason.MISSING_FIELD),
        ({"base_version": "4"}, Reason.WRONG_TYPE),
        ({"held_hash": "0" * 16}, Reason.WRONG_TYPE),
        ({"held_hash": b"short"}, Reason.BAD_VALUE),
        ({"base_version": 3}, Reason.BAD_VALUE),  # a delta spans one version
        ({"base_version": 6}, Reason.BAD_VALUE),
        ({"base_version": -1}, Reason.BAD_VALUE),
        ({"base_version": 5}, Reason.BAD_VALUE),  # a hold has no tensors
        ({"tensors": []}, Reason.BAD_VALUE),  # a delta has some
        ({"keyframe_version": 6}, Reason.BAD_VALUE),
        ({"tensors": [{"name": "*", "dtype": "f99"}]}, Reason.BAD_TENSOR),  # the shared tensor reader
        ({"deadline": float("nan")}, Reason.NON_FINITE),
        ({"task": {"lr": -1.0}}, Reason.BAD_VALUE),
    ],
)
def test_strict_decoding(overrides: dict[str, Any], reason: Reason) -> None:
    assert refusal(wire(**overrides)) is reason


def test_size_and_garbage_are_refused_before_anything_else() -> None:
    payload = delta_message().to_bytes()
    with pytest.raises(DecodeError) as caught:
        GlobalDelta.from_bytes(payload, max_bytes=len(payload) - 1)
    assert caught.value.reason is Reason.TOO_LARGE
    assert refusal(b"\xc1not msgpack") is Reason.MALFORMED
    assert refusal(msgpack.packb([1, 2])) is Reason.WRONG_TYPE


def test_a_receiver_that_predates_deltas_refuses_them_instead_of_training_on_them() -> None:
    with pytest.raises(DecodeError) as caught:
        GlobalModel.from_bytes(delta_message().to_bytes(), max_bytes=MAX, fleet=FLEET)
    assert caught.value.reason is Reason.WRONG_TYPE


def test_full_models_keep_their_bytes_and_may_carry_a_hash() -> None:
    tensors = encode_weights(initial(), parse_chain("none"))
    plain = GlobalModel(FLEET, 3, 4, None, TaskConfig(), SPEC.fingerprint, tensors)
    assert "held_hash" not in msgpack.unpackb(plain.to_bytes(), raw=False)  # an old full broadcast, byte for byte
    assert GlobalModel.from_bytes(plain.to_bytes(), max_bytes=MAX).held_hash is None
    hashed = GlobalModel(FLEET, 3, 4, None, TaskConfig(), SPEC.fingerprint, tensors, held_hash=HASH)
    assert GlobalModel.from_bytes(hashed.to_bytes(), max_bytes=MAX) == hashed
    obj = msgpack.unpackb(hashed.to_bytes(), raw=False)
    obj["held_hash"] = b"x" * 15
    with pytest.raises(DecodeError) as caught:
        GlobalModel.from_bytes(msgpack.packb(obj, use_bin_type=True), max_bytes=MAX)
    assert caught.value.reason is Reason.BAD_VALUE


def test_decode_announcement_takes_either_kind() -> None:
    delta = delta_message()
    full = GlobalModel(FLEET, 3, 4, None, TaskConfig(), SPEC.fingerprint, encode_weights(initial(), parse_chain("none")))
    assert decode_announcement(delta.to_bytes(), max_bytes=MAX, fleet=FLEET) == delta
    assert decode_announcement(full.to_bytes(), max_bytes=MAX, fleet=FLEET) == full
    with pytest.raises(DecodeError) as caught:
        decode_announcement(wire(type="update"), max_bytes=MAX, fleet=FLEET)
    assert caught.value.reason is Reason.WRONG_TYPE
    with pytest.raises(DecodeError) as caught:
        decode_announcement(msgpack.packb([1, 2]), max_bytes=MAX)
    assert caught.value.reason is Reason.WRONG_TYPE


def test_a_delta_carries_the_rounds_cohort_as_a_full_model_does() -> None:
    from fedge_contract.broadcast import Announcement, Broadcast
    from fedge_contract.cohort import InviteSet, Participation

    cohort = Participation(InviteSet.of(["agent-1", "agent-4"], fleet=FLEET, round_no=6, bits=8), eval_threshold=3)
    message = delta_message(cohort=cohort)
    decoded = GlobalDelta.from_bytes(message.to_bytes(), max_bytes=MAX, fleet=FLEET)
    assert decoded == message and decoded.cohort is not None
    assert decoded.cohort.invites("agent-4", fleet=FLEET, round_no=6) and not decoded.cohort.invites("agent-2", fleet=FLEET, round_no=6)
    assert "cohort" not in msgpack.unpackb(delta_message().to_bytes(), raw=False)  # none: every device trains
    about = Announcement(FLEET, 6, None, TaskConfig(), SPEC.fingerprint, cohort=cohort)
    broadcast = Broadcast(5, 4, message.tensors, HASH, 2)
    assert broadcast.message(about).cohort == cohort
    assert Broadcast(5, None, message.tensors, HASH, 5).message(about).cohort == cohort  # a reset: a GlobalModel

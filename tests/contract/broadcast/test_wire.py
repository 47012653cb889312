"""GlobalDelta: one encoder, one strict decoder; old receivers refuse it; full GlobalModels are unchanged."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedge_contract import SCHEMA_VERSION, DecodeError, GlobalModel, Reason, TaskConfig, compact
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


def map_form(message: GlobalDelta) -> dict[str, Any]:
    """The map form, as the first GlobalDelta encoder wrote it (decoders still read it)."""
    return {
        "schema": SCHEMA_VERSION, "type": message.TYPE, "fleet": message.fleet, **({"final": True} if message.final else {}),
        "model_version": message.model_version, "base_version": message.base_version, "keyframe_version": message.keyframe_version,
        "round": message.round, "deadline": message.deadline, "task_id": message.task_id,
        **({} if message.task is None else {"task": message.task.to_wire()}), "fingerprint": message.fingerprint,
        "held_hash": message.held_hash, **({} if message.cohort is None else {"cohort": message.cohort.to_wire()}),
        "tensors": [t.to_wire() for t in message.tensors],
    }


def wire(**overrides: Any) -> bytes:
    """delta_message() in the map form, with fields replaced (``...``: left out)."""
    obj = map_form(delta_message())
    for key, value in overrides.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def slots(message: GlobalDelta | None = None, **overrides: Any) -> bytes:
    """A GlobalDelta in the compact form (its own bytes), with slots replaced by name."""
    obj = msgpack.unpackb((message or delta_message()).to_bytes(), raw=False)
    assert isinstance(obj, list) and len(obj) == len(compact.DELTA_FIELDS)
    for key, value in overrides.items():
        obj[compact.DELTA_FIELDS.index(key)] = value
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
def test_strict_decoding_of_the_map_form(overrides: dict[str, Any], reason: Reason) -> None:
    assert refusal(wire(**overrides)) is reason


def test_the_map_form_still_decodes_to_the_same_message() -> None:
    for message in (delta_message(final=True), delta_message(task=None, task_id=delta_message().task_id)):
        assert GlobalDelta.from_bytes(msgpack.packb(map_form(message), use_bin_type=True), max_bytes=MAX, fleet=FLEET) == message


def test_the_compact_form_is_an_array_without_field_names_and_far_smaller() -> None:
    message = delta_message(task=None, task_id=delta_message().task_id)
    obj = msgpack.unpackb(message.to_bytes(), raw=False)
    assert obj[:3] == ["global_delta", SCHEMA_VERSION, FLEET]
    assert obj[compact.DELTA_FIELDS.index("fingerprint")] == bytes.fromhex(SPEC.fingerprint)
    data = sum(len(t.data) for t in message.tensors)
    map_envelope = len(msgpack.packb(map_form(message), use_bin_type=True)) - data
    assert len(message.to_bytes()) - data < 120 < 240 < map_envelope


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"schema": SCHEMA_VERSION + 1}, Reason.SCHEMA),
        ({"type": "global"}, Reason.WRONG_TYPE),
        ({"fleet": "other"}, Reason.WRONG_FLEET),
        ({"base_version": None}, Reason.WRONG_TYPE),  # nil is not a version
        ({"held_hash": None}, Reason.WRONG_TYPE),
        ({"final": None}, Reason.WRONG_TYPE),  # only task and cohort may be nil
        ({"held_hash": b"short"}, Reason.BAD_VALUE),
        ({"base_version": 3}, Reason.BAD_VALUE),
        ({"base_version": 5}, Reason.BAD_VALUE),  # a hold has no tensors
        ({"tensors": [], "codec": ""}, Reason.BAD_VALUE),  # a delta has some
        ({"tensors": []}, Reason.BAD_VALUE),  # a codec without tensors
        ({"codec": "rot13"}, Reason.CODEC),
        ({"codec": None}, Reason.WRONG_TYPE),
        ({"codec": "flat+topk:0.1+q4+zstd"}, Reason.BAD_TENSOR),  # another codec than the data's: sizes disagree
        ({"tensors": [["*", [SPEC.num_parameters]]]}, Reason.WRONG_TYPE),  # a tensor is [name, shape, data]
        ({"tensors": [["*", [-1], b""]]}, Reason.BAD_TENSOR),
        ({"tensors": "*"}, Reason.WRONG_TYPE),
        ({"fingerprint": b"\1" * 7}, Reason.BAD_VALUE),
        ({"fingerprint": 7}, Reason.WRONG_TYPE),
        ({"deadline": float("nan")}, Reason.NON_FINITE),
        ({"task": {"lr": -1.0}}, Reason.BAD_VALUE),
        ({"cohort": "all"}, Reason.WRONG_TYPE),
    ],
)
def test_strict_decoding_of_the_compact_form(overrides: dict[str, Any], reason: Reason) -> None:
    payload = slots(**overrides)
    if "codec" not in overrides and "tensors" not in overrides:
        assert refusal(payload) is reason
        return
    # codec and tensor slots are read when the message is decoded, sizes when its tensors are
    try:
        decoded = GlobalDelta.from_bytes(payload, max_bytes=MAX, fleet=FLEET)
    except DecodeError as exc:
        assert exc.reason is reason
        return
    from fedge_contract.codecs import decode_weights

    with pytest.raises(DecodeError) as caught:
        decode_weights(decoded.tensors, SPEC)
    assert caught.value.reason is reason


def test_a_compact_array_of_another_length_is_refused() -> None:
    obj = msgpack.unpackb(delta_message().to_bytes(), raw=False)
    for changed in (obj[:-1], [*obj, None]):
        assert refusal(msgpack.packb(changed, use_bin_type=True)) is Reason.WRONG_TYPE


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
    assert msgpack.unpackb(delta_message().to_bytes(), raw=False)[compact.DELTA_FIELDS.index("cohort")] is None  # every device trains
    about = Announcement(FLEET, 6, None, TaskConfig(), SPEC.fingerprint, cohort=cohort)
    broadcast = Broadcast(5, 4, message.tensors, HASH, 2)
    assert broadcast.message(about).cohort == cohort
    assert Broadcast(5, None, message.tensors, HASH, 5).message(about).cohort == cohort  # a reset: a GlobalModel

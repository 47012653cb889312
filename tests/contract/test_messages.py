"""Wire messages: round trips, and every strict-decode rule as a DecodeError with the right Reason."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge_contract import (
    SCHEMA_VERSION,
    DecodeError,
    GlobalModel,
    Presence,
    Reason,
    Receipt,
    ReceiptStatus,
    RoundState,
    RoundStatus,
    TaskConfig,
    Update,
)
from fedge_contract.codecs import EncodedTensor, encode_weights, parse_chain
from fedge_contract.messages import MAX_CONTROL_BYTES, MAX_TENSORS, pack_weights, unpack_weights

FLEET = "f1"
BIG = 10_000_000  # max_bytes that never triggers TOO_LARGE in these tests


# ---------------------------------------------------------------- builders


def tensor_wire(**overrides: Any) -> dict[str, Any]:
    wire = {"name": "w", "dtype": "f32", "shape": [2], "codec": "none", "data": np.array([1.0, -2.0], "<f4").tobytes()}
    wire.update(overrides)
    return wire


def update_wire(**overrides: Any) -> dict[str, Any]:
    """A valid Update as the plain map that goes on the wire; overrides replace fields."""
    wire: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "type": "update",
        "fleet": FLEET,
        "client_id": "agent-1",
        "update_id": "u" * 32,
        "round": 3,
        "base_version": 2,
        "num_samples": 50,
        "metrics": {"loss": 0.25, "accuracy": 0.875},
        "device": {"charging": True, "battery": 80.0, "kind": "pi"},
        "tensors": [tensor_wire()],
    }
    wire.update(overrides)
    return wire


def global_wire(**overrides: Any) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "type": "global",
        "fleet": FLEET,
        "final": False,
        "model_version": 4,
        "round": 4,
        "deadline": 1_700_000_000.5,
        "task": {"local_epochs": 2, "batch_size": 16, "lr": 0.3},
        "fingerprint": "0123456789abcdef",
        "tensors": [tensor_wire()],
    }
    wire.update(overrides)
    return wire


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def without(wire: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in wire.items() if k != key}


def decode_update(obj: Any, fleet: str | None = FLEET) -> Update:
    return Update.from_bytes(pack(obj), max_bytes=BIG, fleet=fleet)


def reason_of(fn, *args: Any, **kwargs: Any) -> Reason:
    with pytest.raises(DecodeError) as info:
        fn(*args, **kwargs)
    return info.value.reason


def make_tensors() -> tuple[EncodedTensor, ...]:
    weights = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "fc.bias": np.array([0.5, -1.5], np.float32)}
    return encode_weights(weights, parse_chain("f16+zstd"))


# ---------------------------------------------------------------- round trips


def test_update_round_trip() -> None:
    update = Update(
        fleet=FLEET, client_id="agent-7", update_id="abc123", round=5, base_version=4, num_samples=123,
        tensors=make_tensors(), metrics={"loss": 0.5, "accuracy": 0.75},
        device={"charging": False, "battery": 42.5, "net": "wifi"},
    )
    decoded = Update.from_bytes(update.to_bytes(), max_bytes=BIG, fleet=FLEET)
    assert decoded == update
    assert decoded.tensors[0].shape == (2, 3) and decoded.tensors[0].codec == "f16+zstd"


def test_global_model_round_trip() -> None:
    model = GlobalModel(
        fleet=FLEET, model_version=9, round=8, deadline=1_700_000_123.25,
        task=TaskConfig(local_epochs=3, batch_size=8, lr=0.1, mu=0.01, codec="bf16+zstd:5", extra={"warmup": 2}),
        fingerprint="feedface00000000", tensors=make_tensors(), final=True,
    )
    decoded = GlobalModel.from_bytes(model.to_bytes(), max_bytes=BIG, fleet=FLEET)
    assert decoded == model
    assert decoded.task.extra == {"warmup": 2}


def test_global_model_without_deadline_round_trips() -> None:
    model = GlobalModel(FLEET, 0, 0, None, TaskConfig(), "x", ())
    assert GlobalModel.from_bytes(model.to_bytes(), max_bytes=BIG) == model


@pytest.mark.parametrize("status", list(ReceiptStatus))
def test_receipt_round_trip(status: ReceiptStatus) -> None:
    receipt = Receipt(FLEET, "agent-1", "u1", status, "bad_value: because", 3, 2)
    assert Receipt.from_bytes(receipt.to_bytes(), fleet=FLEET) == receipt


def test_receipt_without_update_id_round_trips() -> None:
    receipt = Receipt(FLEET, "agent-1", None, ReceiptStatus.REJECTED, "malformed: x", 0, 0)
    assert Receipt.from_bytes(receipt.to_bytes()) == receipt


def test_receipt_is_readable_json() -> None:
    receipt = Receipt(FLEET, "agent-1", "u1", ReceiptStatus.ACCEPTED, "", 3, 2)
    doc = json.loads(receipt.to_bytes())
    assert doc == {
        "schema": 1, "type": "receipt", "fleet": FLEET, "client_id": "agent-1", "update_id": "u1",
        "status": "accepted", "reason": "", "round": 3, "model_version": 2,
    }


def test_presence_round_trip() -> None:
    presence = Presence(FLEET, "agent-2", "online", "0.1.0", eligible=False, why_not="battery 10% < 20%",
                        device={"battery": 10.0, "charging": False, "net": "lte"})
    assert Presence.from_bytes(presence.to_bytes(), fleet=FLEET) == presence
    offline = Presence(FLEET, "agent-2", "offline")
    assert Presence.from_bytes(offline.to_bytes()) == offline
    counted = Presence(FLEET, "agent-2", "offline", dropped=3)
    assert Presence.from_bytes(counted.to_bytes()) == counted


def test_presence_dropped_count_is_optional_both_ways() -> None:
    """Issue 19's count of updates dropped unanswered: an agent before it sends none (read as 0); a
    reader before it takes only the keys it knows, so the extra key changes nothing for it."""
    before = b'{"schema":1,"type":"presence","fleet":"%s","client_id":"a","state":"online","agent_version":"0.1.0",' \
             b'"eligible":true,"why_not":"","device":{}}' % FLEET.encode()
    assert Presence.from_bytes(before).dropped == 0
    assert json.loads(Presence(FLEET, "a", "online", dropped=2).to_bytes())["dropped"] == 2
    assert Presence.from_bytes(js(presence_doc(dropped=2, later_field={"x": 1}))).dropped == 2  # what an old reader does with ours
    assert reason_of(Presence.from_bytes, js(presence_doc(dropped=-1))) is Reason.BAD_VALUE
    assert reason_of(Presence.from_bytes, js(presence_doc(dropped="2"))) is Reason.WRONG_TYPE


def test_round_status_round_trip() -> None:
    status = RoundStatus(FLEET, round=4, model_version=4, state=RoundState.AGGREGATING, accepted=7, target=10, min_updates=2,
                         deadline=1_700_000_000.0, rounds_total=30, last_metrics={"accuracy": 0.93, "loss": 0.21})
    assert RoundStatus.from_bytes(status.to_bytes(), fleet=FLEET) == status
    idle = RoundStatus(FLEET, 0, 0, RoundState.FINISHED, 0, 1, 1, None)
    assert RoundStatus.from_bytes(idle.to_bytes()) == idle
    assert b"note" not in idle.to_bytes()  # optional both ways: an old reader sees what it always saw
    noted = RoundStatus(FLEET, 2, 1, RoundState.OPEN, 0, 5, 3, None, note="secure aggregation: session x, mask phase")
    assert RoundStatus.from_bytes(noted.to_bytes()) == noted
    assert len(RoundStatus(FLEET, 2, 1, RoundState.OPEN, 0, 5, 3, None, note="n" * 5000).note) == 512  # long notes are cut


def test_round_status_traffic_is_optional_both_ways() -> None:
    """bytes_up/bytes_down (issue 16): an old status reads as None, ours writes them only when known, and a reader
    that ignores unknown fields (as every fedge reader does) reads ours as before."""
    traffic = RoundStatus(FLEET, 3, 2, RoundState.OPEN, 1, 5, 1, None, bytes_up=2_136, bytes_down=922)
    assert RoundStatus.from_bytes(traffic.to_bytes()) == traffic
    assert b"bytes_" not in RoundStatus(FLEET, 3, 2, RoundState.OPEN, 1, 5, 1, None).to_bytes()
    old = RoundStatus.from_bytes(js(status_doc()))
    assert old.bytes_up is None and old.bytes_down is None
    assert RoundStatus.from_bytes(js(status_doc(bytes_down=0))).bytes_down == 0
    assert reason_of(RoundStatus.from_bytes, js(status_doc(bytes_down=-1))) is Reason.BAD_VALUE
    assert reason_of(RoundStatus.from_bytes, js(status_doc(bytes_up="922"))) is Reason.WRONG_TYPE


def test_pack_weights_round_trip() -> None:
    weights = {"a": np.array([[1.5, -2.0]], np.float32), "b": np.zeros((0,), np.float32)}
    back = unpack_weights(pack_weights(weights))
    assert list(back) == ["a", "b"]
    np.testing.assert_array_equal(back["a"], weights["a"])
    assert back["b"].shape == (0,)


def test_peek_update_id() -> None:
    limit = 10**6
    assert Update.peek_update_id(pack(update_wire(update_id="abc", num_samples=-1)), limit) == "abc"
    assert Update.peek_update_id(b"\xc1garbage", limit) is None
    assert Update.peek_update_id(pack(update_wire(update_id="x" * 65)), limit) is None
    assert Update.peek_update_id(pack([1, 2]), limit) is None
    # an oversized payload is not even unpacked to find its id
    big = pack(update_wire(update_id="big"))
    assert Update.peek_update_id(big, len(big) - 1) is None


# ---------------------------------------------------------------- envelope rejections


def test_valid_builder_decodes() -> None:
    """The baseline every rejection test mutates is itself valid."""
    update = decode_update(update_wire())
    assert (update.client_id, update.round, update.base_version, update.num_samples) == ("agent-1", 3, 2, 50)
    assert update.device == {"charging": True, "battery": 80.0, "kind": "pi"}


def test_too_large() -> None:
    payload = pack(update_wire())
    assert reason_of(Update.from_bytes, payload, max_bytes=len(payload) - 1) is Reason.TOO_LARGE
    assert Update.from_bytes(payload, max_bytes=len(payload)).update_id == "u" * 32
    assert reason_of(GlobalModel.from_bytes, pack(global_wire()), max_bytes=10) is Reason.TOO_LARGE


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        bytes(range(256)),
        pack(update_wire())[:-5],  # truncated
        pack(update_wire()) + b"\x00",  # trailing data
    ],
    ids=["empty", "reserved-byte", "random", "truncated", "trailing"],
)
def test_malformed_msgpack(payload: bytes) -> None:
    assert reason_of(Update.from_bytes, payload, max_bytes=BIG) is Reason.MALFORMED
    assert reason_of(GlobalModel.from_bytes, payload, max_bytes=BIG) is Reason.MALFORMED


@pytest.mark.parametrize("top", [[1, 2, 3], "update", 7, None, b"bytes"])
def test_non_map_top_level(top: Any) -> None:
    assert reason_of(decode_update, top) is Reason.WRONG_TYPE


def test_non_string_map_keys_are_malformed() -> None:
    assert reason_of(Update.from_bytes, pack({1: 2}), max_bytes=BIG) is Reason.MALFORMED


@pytest.mark.parametrize("schema", [0, 2, SCHEMA_VERSION + 100])
def test_wrong_schema_version(schema: int) -> None:
    assert reason_of(decode_update, update_wire(schema=schema)) is Reason.SCHEMA
    assert reason_of(GlobalModel.from_bytes, pack(global_wire(schema=schema)), max_bytes=BIG) is Reason.SCHEMA


def test_wrong_message_type() -> None:
    assert reason_of(decode_update, update_wire(type="global")) is Reason.WRONG_TYPE
    assert reason_of(GlobalModel.from_bytes, pack(update_wire()), max_bytes=BIG) is Reason.WRONG_TYPE


UPDATE_REQUIRED = ["schema", "type", "fleet", "client_id", "update_id", "round", "base_version", "num_samples", "tensors"]


@pytest.mark.parametrize("field", UPDATE_REQUIRED)
def test_update_missing_field(field: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_update(without(update_wire(), field))
    assert info.value.reason is Reason.MISSING_FIELD
    assert field in info.value.detail


@pytest.mark.parametrize("field", ["name", "dtype", "shape", "codec", "data"])
def test_tensor_missing_field(field: str) -> None:
    wire = update_wire(tensors=[without(tensor_wire(), field)])
    assert reason_of(decode_update, wire) is Reason.MISSING_FIELD


@pytest.mark.parametrize("field", ["model_version", "round", "deadline", "task", "fingerprint", "tensors"])
def test_global_missing_field(field: str) -> None:
    assert reason_of(GlobalModel.from_bytes, pack(without(global_wire(), field)), max_bytes=BIG) is Reason.MISSING_FIELD


def test_optional_update_fields_default_empty() -> None:
    update = decode_update(without(without(update_wire(), "metrics"), "device"))
    assert update.metrics == {} and update.device == {}


@pytest.mark.parametrize(
    "overrides",
    [
        {"round": "3"},
        {"round": True},  # bool is not an int on the wire
        {"round": 3.0},
        {"base_version": None},
        {"num_samples": 50.5},
        {"num_samples": False},
        {"schema": "1"},
        {"client_id": 7},
        {"update_id": b"abc"},
        {"fleet": None},
        {"metrics": [1.0]},
        {"metrics": {"loss": "low"}},
        {"metrics": {"loss": True}},
        {"device": {"nested": {"a": 1}}},
        {"device": {"list": [1]}},
        {"tensors": {"w": 1}},
        {"tensors": [[1, 2]]},
        {"tensors": [tensor_wire(data="not bytes")]},
        {"tensors": [tensor_wire(shape="2")]},
        {"tensors": [tensor_wire(shape=[1] * 9)]},
        {"tensors": [tensor_wire(name=None)]},
    ],
    ids=lambda o: repr(o)[:40],
)
def test_update_wrong_type(overrides: dict[str, Any]) -> None:
    assert reason_of(decode_update, update_wire(**overrides)) is Reason.WRONG_TYPE


def test_metrics_keys_must_be_strings() -> None:
    assert reason_of(decode_update, update_wire(metrics={b"loss": 1.0})) is Reason.WRONG_TYPE


def test_ints_are_accepted_as_floats() -> None:
    update = decode_update(update_wire(metrics={"loss": 1}))
    assert update.metrics == {"loss": 1.0} and isinstance(update.metrics["loss"], float)


def test_wrong_fleet() -> None:
    assert reason_of(decode_update, update_wire(fleet="other")) is Reason.WRONG_FLEET
    assert decode_update(update_wire(fleet="other"), fleet=None).fleet == "other"  # no fleet given: no check
    assert reason_of(GlobalModel.from_bytes, pack(global_wire()), max_bytes=BIG, fleet="other") is Reason.WRONG_FLEET


@pytest.mark.parametrize("dtype", ["f128", "float32", "", "F32"])
def test_unknown_dtype(dtype: str) -> None:
    assert reason_of(decode_update, update_wire(tensors=[tensor_wire(dtype=dtype)])) is Reason.BAD_TENSOR


@pytest.mark.parametrize("shape", [[-1], [2**31], [True]])
def test_bad_shape_dimension(shape: list[Any]) -> None:
    assert reason_of(decode_update, update_wire(tensors=[tensor_wire(shape=shape)])) is Reason.BAD_TENSOR


@pytest.mark.parametrize("num_samples", [0, -1, -(2**63)])
def test_num_samples_must_be_positive(num_samples: int) -> None:
    assert reason_of(decode_update, update_wire(num_samples=num_samples)) is Reason.BAD_VALUE


@pytest.mark.parametrize("field", ["round", "base_version"])
def test_negative_counters(field: str) -> None:
    assert reason_of(decode_update, update_wire(**{field: -1})) is Reason.BAD_VALUE


@pytest.mark.parametrize("update_id", ["", "x" * 65, "x" * 1000])
def test_update_id_length(update_id: str) -> None:
    assert reason_of(decode_update, update_wire(update_id=update_id)) is Reason.BAD_VALUE


def test_update_id_of_64_chars_is_fine() -> None:
    assert decode_update(update_wire(update_id="x" * 64)).update_id == "x" * 64


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metric(value: float) -> None:
    assert reason_of(decode_update, update_wire(metrics={"loss": value})) is Reason.NON_FINITE


def test_non_finite_device_value() -> None:
    assert reason_of(decode_update, update_wire(device={"temperature": math.nan})) is Reason.NON_FINITE


def test_non_finite_deadline_and_lr() -> None:
    assert reason_of(GlobalModel.from_bytes, pack(global_wire(deadline=math.inf)), max_bytes=BIG) is Reason.NON_FINITE
    task = {"local_epochs": 1, "batch_size": 1, "lr": math.nan}
    assert reason_of(GlobalModel.from_bytes, pack(global_wire(task=task)), max_bytes=BIG) is Reason.NON_FINITE


def test_too_many_metrics() -> None:
    assert reason_of(decode_update, update_wire(metrics={f"m{i}": 1.0 for i in range(65)})) is Reason.BAD_VALUE
    assert len(decode_update(update_wire(metrics={f"m{i}": 1.0 for i in range(64)})).metrics) == 64


def test_too_many_tensors() -> None:
    tiny = tensor_wire(shape=[0], data=b"")
    assert reason_of(decode_update, update_wire(tensors=[tiny] * (MAX_TENSORS + 1))) is Reason.BAD_VALUE


@pytest.mark.parametrize(
    "task",
    [{"local_epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": -0.1}],
)
def test_task_config_bad_values(task: dict[str, Any]) -> None:
    assert reason_of(GlobalModel.from_bytes, pack(global_wire(task=task)), max_bytes=BIG) is Reason.BAD_VALUE


def test_task_config_wrong_type() -> None:
    assert reason_of(GlobalModel.from_bytes, pack(global_wire(task={"codec": 5})), max_bytes=BIG) is Reason.WRONG_TYPE
    assert reason_of(GlobalModel.from_bytes, pack(global_wire(task=[1])), max_bytes=BIG) is Reason.WRONG_TYPE


def test_final_must_be_bool() -> None:
    assert reason_of(GlobalModel.from_bytes, pack(global_wire(final=1)), max_bytes=BIG) is Reason.WRONG_TYPE


@pytest.mark.parametrize("kind", ["list", "map"])
def test_deep_nesting_is_a_decode_error(kind: str) -> None:
    depth = 100_000
    opener = b"\x91" if kind == "list" else b"\x81\xa1k"  # fixarray(1) / fixmap(1) {"k": ...}
    payload = opener * depth + b"\xc0"
    assert reason_of(Update.from_bytes, payload, max_bytes=BIG) is Reason.MALFORMED
    assert reason_of(GlobalModel.from_bytes, payload, max_bytes=BIG) is Reason.MALFORMED


def test_nesting_inside_a_field_is_a_decode_error() -> None:
    nested: Any = 1
    for _ in range(500):
        nested = [nested]
    with pytest.raises(DecodeError):
        decode_update(update_wire(device={"x": nested}))


# ---------------------------------------------------------------- JSON control messages


def receipt_doc(**overrides: Any) -> dict[str, Any]:
    doc = {"schema": 1, "type": "receipt", "fleet": FLEET, "client_id": "a", "update_id": "u", "status": "accepted",
           "reason": "", "round": 1, "model_version": 1}
    doc.update(overrides)
    return doc


def status_doc(**overrides: Any) -> dict[str, Any]:
    doc = {"schema": 1, "type": "status", "fleet": FLEET, "round": 1, "model_version": 1, "state": "open",
           "accepted": 0, "target": 2, "min": 1, "deadline": 12.5}
    doc.update(overrides)
    return doc


def presence_doc(**overrides: Any) -> dict[str, Any]:
    doc = {"schema": 1, "type": "presence", "fleet": FLEET, "client_id": "a", "state": "online"}
    doc.update(overrides)
    return doc


def js(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_non_finite_constants_are_refused(constant: str) -> None:
    payload = js(status_doc()).replace(b"12.5", constant.encode())
    assert constant.encode() in payload
    assert reason_of(RoundStatus.from_bytes, payload) is Reason.MALFORMED
    payload = js(receipt_doc()).replace(b'"round": 1', b'"round": ' + constant.encode())
    assert reason_of(Receipt.from_bytes, payload) is Reason.MALFORMED


def test_json_overflowing_float_literal_is_non_finite() -> None:
    payload = js(status_doc()).replace(b"12.5", b"1e999")  # json parses this to inf
    assert reason_of(RoundStatus.from_bytes, payload) is Reason.NON_FINITE


@pytest.mark.parametrize(
    "decode, payload",
    [
        (RoundStatus.from_bytes, js(status_doc(deadline=10**400))),
        (RoundStatus.from_bytes, js(status_doc(last_metrics={"loss": 10**400}))),
        (Presence.from_bytes, js(presence_doc(device={"battery": 10**400}))),
    ],
    ids=["status.deadline", "status.last_metrics", "presence.device"],
)
def test_json_huge_int_in_float_field_is_a_decode_error(decode, payload: bytes) -> None:
    assert reason_of(decode, payload) in (Reason.NON_FINITE, Reason.BAD_VALUE)


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe{}", js(receipt_doc()).replace(b'"a"', b'"\xc3\x28"'), b"", b"{", b"[" * 30_000 + b"]" * 30_000],
    ids=["bad-bom", "bad-utf8-in-string", "empty", "truncated", "deep"],
)
def test_json_malformed(payload: bytes) -> None:
    assert reason_of(Receipt.from_bytes, payload) is Reason.MALFORMED
    assert reason_of(Presence.from_bytes, payload) is Reason.MALFORMED
    assert reason_of(RoundStatus.from_bytes, payload) is Reason.MALFORMED


def test_json_too_large() -> None:
    payload = js(receipt_doc(reason="x" * MAX_CONTROL_BYTES))
    assert reason_of(Receipt.from_bytes, payload) is Reason.TOO_LARGE


def test_json_checks() -> None:
    assert reason_of(Receipt.from_bytes, js([receipt_doc()])) is Reason.WRONG_TYPE
    assert reason_of(Receipt.from_bytes, js(receipt_doc(schema=2))) is Reason.SCHEMA
    assert reason_of(Receipt.from_bytes, js(receipt_doc(type="status"))) is Reason.WRONG_TYPE
    assert reason_of(Receipt.from_bytes, js(receipt_doc()), fleet="other") is Reason.WRONG_FLEET
    assert reason_of(Receipt.from_bytes, js(receipt_doc(status="maybe"))) is Reason.BAD_VALUE
    assert reason_of(Receipt.from_bytes, js(without(receipt_doc(), "reason"))) is Reason.MISSING_FIELD
    assert reason_of(Receipt.from_bytes, js(receipt_doc(round=-1))) is Reason.BAD_VALUE
    assert reason_of(Receipt.from_bytes, js(receipt_doc(round=1.0))) is Reason.WRONG_TYPE
    assert reason_of(Receipt.from_bytes, js(receipt_doc(round=True))) is Reason.WRONG_TYPE
    assert reason_of(Presence.from_bytes, js(presence_doc(state="asleep"))) is Reason.BAD_VALUE
    assert reason_of(Presence.from_bytes, js(presence_doc(eligible="yes"))) is Reason.WRONG_TYPE
    assert reason_of(RoundStatus.from_bytes, js(status_doc(state="closed"))) is Reason.BAD_VALUE
    assert reason_of(RoundStatus.from_bytes, js(without(status_doc(), "min"))) is Reason.MISSING_FIELD


# ---------------------------------------------------------------- fuzzing: only DecodeError ever escapes


def _decodes_or_decode_error(fn, payload: bytes, **kwargs: Any) -> None:
    try:
        fn(payload, **kwargs)
    except DecodeError:
        pass


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(payload: bytes) -> None:
    _decodes_or_decode_error(Update.from_bytes, payload, max_bytes=BIG)
    _decodes_or_decode_error(GlobalModel.from_bytes, payload, max_bytes=BIG)
    _decodes_or_decode_error(Receipt.from_bytes, payload)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from([*UPDATE_REQUIRED, "metrics", "device"]), msgpack_values)
def test_fuzz_one_update_field(field: str, value: Any) -> None:
    """Replace one field of a valid update with anything msgpack can carry."""
    _decodes_or_decode_error(Update.from_bytes, pack(update_wire(**{field: value})), max_bytes=BIG)


@FUZZ
@given(st.sampled_from(["name", "dtype", "shape", "codec", "data", "extra"]), msgpack_values)
def test_fuzz_one_tensor_field(field: str, value: Any) -> None:
    _decodes_or_decode_error(Update.from_bytes, pack(update_wire(tensors=[tensor_wire(**{field: value})])), max_bytes=BIG)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(list(receipt_doc())), json_values)
def test_fuzz_one_receipt_field(field: str, value: Any) -> None:
    _decodes_or_decode_error(Receipt.from_bytes, js(receipt_doc(**{field: value})))


def test_pieces_and_buffers_hold_the_same_bytes_as_packb() -> None:
    """fedge_contract.packing: a large message assembled a piece at a time is byte for byte msgpack's own."""
    import msgpack

    from fedge_contract.codecs import encode_weights, parse_chain
    from fedge_contract.messages import pack_weights, unpack_weights, weight_pieces
    from fedge_contract.packing import STEP, steps

    rng = np.random.default_rng(0)
    weights = {"big": rng.standard_normal((1500, 1000)).astype(np.float32), "small": np.ones(5, np.float32),
               "wide": np.arange(6, dtype=np.float64).reshape(2, 3)}
    expected = msgpack.packb([t.to_wire() for t in encode_weights(weights, parse_chain("none"))], use_bin_type=True)
    assert pack_weights(weights) == expected == b"".join(weight_pieces(weights))
    assert all(len(step) <= STEP for step in steps(weight_pieces(weights)))
    assert all(np.array_equal(unpack_weights(expected)[k], np.asarray(v, np.float32)) for k, v in weights.items())
    model = GlobalModel("f", 3, 4, None, TaskConfig(), "fp", encode_weights(weights, parse_chain("none")))
    assert bytes(model.to_buffer()) == model.to_bytes()

"""The compact Update: the same message in a third of the envelope, strict, and never sent to a receiver that cannot read it."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract import SCHEMA_VERSION, DecodeError, Reason, TaskConfig, Update, compact, new_update_id
from fedge_contract.broadcast import task_id
from fedge_contract.codecs import BF16_MAX, encode_weights, parse_chain
from fedge_contract.messages import _header

FLEET = "f1"
BIG = 1 << 24
RNG = np.random.default_rng(0)
DELTA = {"w": RNG.standard_normal((128, 64)).astype(np.float32), "b": RNG.standard_normal(128).astype(np.float32)}


def update(chain: str = "flat+topk:0.01+rice+q4", **overrides: Any) -> Update:
    fields: dict[str, Any] = {
        "fleet": FLEET, "client_id": "agent-12", "update_id": new_update_id(), "round": 12, "base_version": 11, "num_samples": 57,
        "tensors": encode_weights(DELTA, parse_chain(chain), np.random.default_rng(1)),
        "metrics": {"loss": 0.5, "accuracy": 0.875, "train_seconds": 2.25},
        "device": {"charging": True, "battery": 80.0},
    }
    return Update(**{**fields, **overrides})


def slots(message: Update | None = None, **overrides: Any) -> bytes:
    obj = msgpack.unpackb((message or update()).to_bytes(compact=True), raw=False)
    for key, value in overrides.items():
        obj[compact.UPDATE_FIELDS.index(key)] = value
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def refusal(payload: bytes) -> Reason:
    with pytest.raises(DecodeError) as caught:
        Update.from_bytes(payload, max_bytes=BIG, fleet=FLEET)
    return caught.value.reason


@pytest.mark.parametrize("chain", ["none", "flat+topk:0.01+q4+zstd", "flat+topk:0.01+rice+q4", "topk:0.1+q8+zstd", "flat+topk:0.02+rice+sign"])
def test_both_forms_decode_to_the_same_update(chain: str) -> None:
    message = update(chain)
    for payload in (message.to_bytes(), message.to_bytes(compact=True)):
        assert Update.from_bytes(payload, max_bytes=BIG, fleet=FLEET) == message


def test_the_compact_envelope_is_a_third_of_the_maps() -> None:
    message = update(device={})
    data = sum(len(t.data) for t in message.tensors)
    envelope_map, envelope_compact = len(message.to_bytes()) - data, len(message.to_bytes(compact=True)) - data
    assert envelope_compact < 90 and envelope_map > 235, (envelope_compact, envelope_map)
    obj = msgpack.unpackb(message.to_bytes(compact=True), raw=False)
    assert obj[:3] == ["update", SCHEMA_VERSION, FLEET] and obj[compact.UPDATE_FIELDS.index("codec")] == "flat+topk:0.01+rice+q4"
    assert obj[compact.UPDATE_FIELDS.index("tensors")] == [["*", [128 * 64 + 128], message.tensors[0].data]]


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(compact.COMPACT_METRICS), st.floats(allow_nan=True, allow_infinity=True, width=32)))
def test_metrics_travel_as_bfloat16_saturated_and_nan_means_not_reported(metrics: dict[str, float]) -> None:
    decoded = Update.from_bytes(update(metrics=metrics).to_bytes(compact=True), max_bytes=BIG).metrics
    assert set(decoded) == {name for name, value in metrics.items() if not np.isnan(value)}
    for name, value in decoded.items():
        sent = float(np.clip(metrics[name], -BF16_MAX, BF16_MAX))
        assert abs(value - sent) <= abs(sent) * 2**-8 + 2**-126, (name, sent, value)  # subnormals may round to 0


def test_only_the_agents_metrics_fit_the_compact_form() -> None:
    with pytest.raises(ValueError):
        update(metrics={"f1_score": 0.5}).to_bytes(compact=True)
    assert Update.from_bytes(update(metrics={}).to_bytes(compact=True), max_bytes=BIG).metrics == {}


@pytest.mark.parametrize("overrides, reason", [
    ({"type": "global_delta"}, Reason.WRONG_TYPE),
    ({"schema": SCHEMA_VERSION + 1}, Reason.SCHEMA),
    ({"fleet": "other"}, Reason.WRONG_FLEET),
    ({"client_id": None}, Reason.WRONG_TYPE),
    ({"update_id": ""}, Reason.BAD_VALUE),
    ({"round": -1}, Reason.BAD_VALUE),
    ({"num_samples": 0}, Reason.BAD_VALUE),
    ({"metrics": b"\0" * 5}, Reason.WRONG_TYPE),
    ({"metrics": {"loss": 0.5}}, Reason.WRONG_TYPE),  # the compact form's metrics are bfloat16 bytes
    ({"metrics": np.array([0x7F80, 0, 0], "<u2").tobytes()}, Reason.NON_FINITE),  # +inf
    ({"device": {"battery": float("nan")}}, Reason.NON_FINITE),
    ({"device": [1]}, Reason.WRONG_TYPE),
    ({"codec": "rot13"}, Reason.CODEC),
    ({"codec": 3}, Reason.WRONG_TYPE),
    ({"tensors": [["*", [8320]]]}, Reason.WRONG_TYPE),
    ({"tensors": [["*", "8320", b""]]}, Reason.WRONG_TYPE),
    ({"tensors": [["*", [8320], "data"]]}, Reason.WRONG_TYPE),
    ({"tensors": [], "codec": "none"}, Reason.BAD_VALUE),
])
def test_strict_decoding(overrides: dict[str, Any], reason: Reason) -> None:
    assert refusal(slots(**overrides)) is reason


def test_an_array_of_another_length_is_refused_and_its_update_id_not_guessed() -> None:
    obj = msgpack.unpackb(update().to_bytes(compact=True), raw=False)
    for changed in (obj[:-1], [*obj, None], []):
        payload = msgpack.packb(changed, use_bin_type=True)
        assert refusal(payload) is Reason.WRONG_TYPE
        assert Update.peek_update_id(payload, BIG) is None
    message = update()
    assert Update.peek_update_id(message.to_bytes(compact=True), BIG) == message.update_id


def test_an_old_aggregator_refuses_a_compact_update_instead_of_misreading_it() -> None:
    """Decoders before the compact form read the top level as a map (messages._header, unchanged since)."""
    with pytest.raises(DecodeError) as caught:
        _header(msgpack.unpackb(update().to_bytes(compact=True), raw=False), "update", FLEET)
    assert caught.value.reason is Reason.WRONG_TYPE and "must be a map" in caught.value.detail


def test_the_task_asks_for_compact_updates_and_an_older_task_does_not() -> None:
    assert TaskConfig().update_form == "compact" and TaskConfig().to_wire()["update_form"] == "compact"
    old_wire = {k: v for k, v in TaskConfig().to_wire().items() if k != "update_form"}  # an aggregator before the field
    old = TaskConfig.from_wire(old_wire)
    assert old.update_form == "map" and "update_form" not in old.to_wire()
    # the same task id an older contract computes from that task (it never saw the field)
    assert task_id(old) == task_id(TaskConfig(update_form="map"))
    new = TaskConfig.from_wire(msgpack.unpackb(msgpack.packb(TaskConfig().to_wire()), raw=False))
    assert new == TaskConfig() and task_id(new) == task_id(TaskConfig())


def test_tensors_of_several_codecs_or_with_extra_fields_need_the_map_form() -> None:
    mixed = (*encode_weights({"a": DELTA["b"]}, parse_chain("q8")), *encode_weights({"b": DELTA["b"]}, parse_chain("q4")))
    with pytest.raises(ValueError):
        update(tensors=mixed).to_bytes(compact=True)
    assert Update.from_bytes(update(tensors=mixed).to_bytes(), max_bytes=BIG).tensors == mixed

"""Untrusted update bytes -> trusted Update and delta, or a Rejection whose reason names the rule."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.errors import Rejection
from aggregator.ingest.validation import UpdateLimits, decode_delta, parse_update
from fedge_contract import ReceiptStatus, Update
from fedge_contract.codecs import EncodedTensor, encode_weights, parse_chain
from fedge_contract.tensors import ModelSpec, TensorSpec

SPEC = ModelSpec((TensorSpec("w", (2, 3)), TensorSpec("b", (3,))))
DELTA = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 4, "b": np.array([1.0, -1.0, 0.5], np.float32)}
LIMITS = UpdateLimits(max_bytes=1 << 20, max_num_samples=1000)


def make_update(*, client: str = "agent-1", num_samples: int = 10, fleet: str = "f",
                tensors: tuple[EncodedTensor, ...] | None = None) -> Update:
    if tensors is None:
        tensors = encode_weights(DELTA, parse_chain("f16+zstd"))
    return Update(
        fleet=fleet, client_id=client, update_id="u1", round=1, base_version=0, num_samples=num_samples, tensors=tensors
    )


def rejected(fn, *args, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as info:
        fn(*args, **kwargs)
    return info.value


def test_parse_update_accepts_a_valid_update() -> None:
    update = make_update()
    assert parse_update(update.to_bytes(), topic_client="agent-1", fleet="f", limits=LIMITS) == update


def test_client_id_must_match_the_topic() -> None:
    error = rejected(parse_update, make_update(client="agent-2").to_bytes(), topic_client="agent-1", fleet="f", limits=LIMITS)
    assert error.status is ReceiptStatus.REJECTED
    assert error.reason.startswith("client_mismatch")
    assert "agent-2" in error.reason and "agent-1" in error.reason


def test_num_samples_is_capped() -> None:
    parse_update(make_update(num_samples=1000).to_bytes(), topic_client="agent-1", fleet="f", limits=LIMITS)
    error = rejected(parse_update, make_update(num_samples=1001).to_bytes(), topic_client="agent-1", fleet="f", limits=LIMITS)
    assert error.status is ReceiptStatus.REJECTED and error.reason.startswith("bad_value")


def test_decode_errors_become_rejections_with_their_reason() -> None:
    payload = make_update().to_bytes()
    too_small = UpdateLimits(max_bytes=len(payload) - 1)
    assert rejected(parse_update, payload, topic_client="agent-1", fleet="f", limits=too_small).reason.startswith("too_large")
    assert rejected(parse_update, b"\xc1", topic_client="agent-1", fleet="f", limits=LIMITS).reason.startswith("malformed")
    error = rejected(parse_update, payload, topic_client="agent-1", fleet="other", limits=LIMITS)
    assert error.status is ReceiptStatus.REJECTED and error.reason.startswith("wrong_fleet")


def test_limits_for_model() -> None:
    assert SPEC.nbytes == 36
    assert UpdateLimits.for_model(SPEC).max_bytes == 36 * 5 // 4 + 64 * 1024
    assert UpdateLimits.for_model(SPEC, max_bytes=500).max_bytes == 500
    assert UpdateLimits.for_model(SPEC).max_num_samples == 10_000_000


def test_decode_delta() -> None:
    delta = decode_delta(make_update(tensors=encode_weights(DELTA, parse_chain("zstd"))), SPEC)
    assert list(delta) == ["w", "b"]
    np.testing.assert_array_equal(delta["w"], DELTA["w"])
    np.testing.assert_array_equal(delta["b"], DELTA["b"])


def test_decode_delta_rejects_a_shape_mismatch() -> None:
    wrong = dict(DELTA, w=np.zeros((3, 2), np.float32))
    error = rejected(decode_delta, make_update(tensors=encode_weights(wrong, parse_chain("none"))), SPEC)
    assert error.status is ReceiptStatus.REJECTED and error.reason.startswith("shape_mismatch")


def test_decode_delta_rejects_a_missing_tensor() -> None:
    error = rejected(decode_delta, make_update(tensors=encode_weights({"w": DELTA["w"]}, parse_chain("none"))), SPEC)
    assert error.reason.startswith("shape_mismatch") and "b" in error.reason


@pytest.mark.parametrize("codec", ["none", "f16", "bf16+zstd"])
def test_decode_delta_rejects_nan(codec: str) -> None:
    bad = dict(DELTA, b=np.array([1.0, np.nan, 0.0], np.float32))
    error = rejected(decode_delta, make_update(tensors=encode_weights(bad, parse_chain(codec))), SPEC)
    assert error.status is ReceiptStatus.REJECTED and error.reason.startswith("non_finite")

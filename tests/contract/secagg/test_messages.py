"""The eight messages: exact round trips, and strict decoders that refuse everything else with a reason."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract.errors import DecodeError, Reason
from fedge_contract.secagg import MaskedInput, Setup
from fedge_contract.secagg.messages import MESSAGE_TYPES, Message, field_names
from tests.contract.secagg.relay import Dropouts, Relay, make_setup, random_inputs

HEADER = ("schema", "type", "fleet", "round", "session", "sender")


def _examples() -> dict[type[Message], Message]:
    """One real message of each type, from a protocol run with a dropout (so a Reveal carries keys too)."""
    setup = make_setup(8, degree=4, threshold=3, min_survivors=3, length=6)
    relay = Relay(setup, random_inputs(setup), Dropouts(after_shares=frozenset(setup.cohort[:1])))
    relay.run()
    found: dict[type[Message], Message] = {}
    for payload in relay.server_saw:
        for kind in MESSAGE_TYPES:
            try:
                message = kind.from_bytes(payload, max_bytes=1 << 20)
            except DecodeError:
                continue
            if not (kind.__name__ == "Reveal" and not message.keys):  # type: ignore[attr-defined]
                found.setdefault(kind, message)
    assert set(found) == set(MESSAGE_TYPES)
    return found


EXAMPLES = _examples()
KINDS = sorted(EXAMPLES, key=lambda k: k.TYPE)


def _as_map(message: Message) -> dict[str, Any]:
    payload = message.to_bytes()
    return json.loads(payload) if message.JSON else msgpack.unpackb(payload, raw=False)  # type: ignore[no-any-return]


def _to_bytes(kind: type[Message], body: Any) -> bytes:
    return json.dumps(body).encode() if kind.JSON else msgpack.packb(body, use_bin_type=True)


def _refusal(kind: type[Message], body: Any, **kw: Any) -> Reason:
    with pytest.raises(DecodeError) as refused:
        kind.from_bytes(_to_bytes(kind, body), **kw)
    return refused.value.reason


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.TYPE)
def test_round_trip(kind: type[Message]) -> None:
    message = EXAMPLES[kind]
    assert kind.from_bytes(message.to_bytes(), fleet="fleet") == message


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.TYPE)
def test_header_rules(kind: type[Message]) -> None:
    body = _as_map(EXAMPLES[kind])
    for key in HEADER + field_names(kind):
        assert _refusal(kind, {k: v for k, v in body.items() if k != key}) is Reason.MISSING_FIELD, key
    assert _refusal(kind, {**body, "schema": 2}) is Reason.SCHEMA
    assert _refusal(kind, {**body, "type": "secagg_other"}) is Reason.WRONG_TYPE
    assert _refusal(kind, body, fleet="another") is Reason.WRONG_FLEET
    assert _refusal(kind, {**body, "round": -1}) is Reason.BAD_VALUE
    assert _refusal(kind, {**body, "round": "7"}) is Reason.WRONG_TYPE
    assert _refusal(kind, {**body, "round": True}) is Reason.WRONG_TYPE
    assert _refusal(kind, {**body, "sender": "a/b"}) is Reason.BAD_VALUE
    assert _refusal(kind, {**body, "session": "#"}) is Reason.BAD_VALUE
    assert _refusal(kind, [body]) is Reason.WRONG_TYPE


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.TYPE)
def test_oversized_and_broken_payloads(kind: type[Message]) -> None:
    payload = EXAMPLES[kind].to_bytes()
    with pytest.raises(DecodeError) as refused:
        kind.from_bytes(payload, max_bytes=len(payload) - 1)
    assert refused.value.reason is Reason.TOO_LARGE
    for broken in (payload[: len(payload) // 2], b"\xc1", b"\xff\xfe", payload + b"\x00"):
        with pytest.raises(DecodeError) as refused:
            kind.from_bytes(broken)
        assert refused.value.reason in (Reason.MALFORMED, Reason.WRONG_TYPE), broken


def _setup_body(**changes: Any) -> dict[str, Any]:
    return {**_as_map(EXAMPLES[Setup]), **changes}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"cohort": ["b", "a", "c"]}, Reason.BAD_VALUE),  # not sorted
        ({"cohort": ["a", "a", "b"]}, Reason.BAD_VALUE),  # repeated
        ({"cohort": ["a"]}, Reason.BAD_VALUE),  # a sum of one is no secret
        ({"cohort": "a,b"}, Reason.WRONG_TYPE),
        ({"degree": 3}, Reason.BAD_VALUE),  # odd
        ({"threshold": 1}, Reason.BAD_VALUE),
        ({"threshold": 5}, Reason.BAD_VALUE),  # above the degree 4
        ({"min_survivors": 9}, Reason.BAD_VALUE),  # above the cohort of 8
        ({"ring_bits": 7}, Reason.BAD_VALUE),
        ({"ring_bits": 8, "cohort": [f"d{i:03d}" for i in range(200)]}, Reason.BAD_VALUE),  # 8 bits cannot sum 200
        ({"length": 0}, Reason.BAD_VALUE),
        ({"clip": 0}, Reason.BAD_VALUE),
        ({"clip": 1e300}, Reason.BAD_VALUE),
        ({"clip": "8"}, Reason.WRONG_TYPE),
    ],
)
def test_setup_parameters_are_checked(changes: dict[str, Any], reason: Reason) -> None:
    assert _refusal(Setup, _setup_body(**changes)) is reason


def test_json_constants_are_refused() -> None:
    payload = json.dumps(_setup_body(clip=1.0)).replace('"clip": 1.0', '"clip": NaN').encode()
    with pytest.raises(DecodeError) as refused:
        Setup.from_bytes(payload)
    assert refused.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    ("kind_name", "key", "value"),
    [
        ("KeyAdvert", "cipher_key", b"\x01" * 31),
        ("KeyAdvert", "mask_key", "not bytes"),
        ("KeyList", "graph_seed", b"\x00" * 33),
        ("KeyList", "members", ["b", "a"]),
        ("KeyList", "peers", [{"client_id": "a", "cipher_key": b"\x00" * 32}]),
        ("KeyList", "peers", "nope"),
        ("Shares", "seed_commitment", b""),
        ("Shares", "boxes", [{"peer": "a", "box": b"\x00" * 93}]),
        ("ShareBundle", "boxes", [{"peer": "b", "box": b"\x00" * 94}, {"peer": "a", "box": b"\x00" * 94}]),
        ("MaskedInput", "data", b"\x00" * 5),
        ("MaskedInput", "bits", 65),
        ("MaskedInput", "length", 0),
        ("UnmaskRequest", "survivors", ["x", "x"]),
        ("UnmaskRequest", "dropped", [1, 2]),
        ("Reveal", "seeds", [{"peer": "a", "share": b"\x00" * 32}]),
        ("Reveal", "keys", [{"peer": "a"}]),
    ],
)
def test_field_rules(kind_name: str, key: str, value: Any) -> None:
    kind = next(k for k in KINDS if k.__name__ == kind_name)
    body = {**_as_map(EXAMPLES[kind]), key: value}
    assert _refusal(kind, body) in (Reason.BAD_VALUE, Reason.WRONG_TYPE, Reason.MISSING_FIELD)


def test_a_masked_input_needs_the_bytes_its_length_and_bits_say() -> None:
    example = EXAMPLES[MaskedInput]
    body = _as_map(example)
    assert _refusal(MaskedInput, {**body, "bits": 16}) is Reason.BAD_VALUE  # 6 x 4 bytes are not 6 x 2
    assert _refusal(MaskedInput, {**body, "length": body["length"] + 1}) is Reason.BAD_VALUE


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(KINDS), st.binary(max_size=300))
def test_random_bytes_are_refused_with_a_reason(kind: type[Message], payload: bytes) -> None:
    try:
        kind.from_bytes(payload)
    except DecodeError as exc:
        assert isinstance(exc.reason, Reason)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.sampled_from(KINDS), st.data())
def test_any_field_replaced_by_anything_is_refused_or_still_a_valid_message(kind: type[Message], data: st.DataObject) -> None:
    body = _as_map(EXAMPLES[kind])
    key = data.draw(st.sampled_from(sorted(body)), label="key")
    value = data.draw(plain, label="value")
    if kind.JSON and isinstance(value, bytes):
        value = value.hex()
    try:
        payload = _to_bytes(kind, {**body, key: value})
    except (TypeError, ValueError, OverflowError):
        return  # not representable in this encoding at all
    try:
        decoded = kind.from_bytes(payload)
    except DecodeError as exc:
        assert isinstance(exc.reason, Reason)
        return
    assert kind.from_bytes(decoded.to_bytes()) == decoded  # what is taken re-encodes to itself

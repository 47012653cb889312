"""Hostile update payloads through the aggregator's whole validation path (parse_update, decode_delta).

Every payload, hand-made or generated, must end as a typed Rejection with a stable reason code
(or, for a harmless mutation, a valid update): never another exception, never unbounded memory.
The same corpus is flooded at a real aggregator in tests/integration/test_fuzz_flood.py.
"""

from __future__ import annotations

import math
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.errors import Rejection
from aggregator.ingest.validation import UpdateLimits, decode_delta, parse_update
from fedge_contract import Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.compact import UPDATE_FIELDS
from fedge_contract.tensors import ModelSpec

FLEET = "fuzz"
SPEC = ModelSpec.of({"fc.weight": np.zeros((16, 8), np.float32), "fc.bias": np.zeros(16, np.float32)})
LIMITS = UpdateLimits.for_model(SPEC, max_num_samples=100_000, allowed_clients=frozenset({"mallory", "agent-0"}))
REASONS = {
    "too_large", "malformed", "schema", "missing_field", "wrong_type", "bad_value", "bad_tensor", "shape_mismatch",
    "non_finite", "wrong_fleet", "client_mismatch", "codec", "unknown_client",
}


def valid(update_id: str = "ok", *, client: str = "mallory", codec: str = "none", fill: float = 0.01,
          spec: ModelSpec = SPEC, fleet: str = FLEET, **fields) -> dict:
    delta = {t.name: np.full(t.shape, fill, np.float32) for t in spec.tensors}
    update = Update(fleet, client, update_id, 1, 0, 10, encode_weights(delta, parse_chain(codec)))
    raw = msgpack.unpackb(update.to_bytes(), raw=False)
    raw.update(fields)
    return raw


def with_tensor(update_id: str, spec: ModelSpec = SPEC, fleet: str = FLEET, **tensor_fields) -> bytes:
    raw = valid(update_id, spec=spec, fleet=fleet)
    raw["tensors"][0].update(tensor_fields)
    return msgpack.packb(raw)


def corpus(spec: ModelSpec = SPEC, *, fleet: str = FLEET, max_bytes: int = LIMITS.max_bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (topic client, payload): the hand-made nasty payloads, for ``spec``'s model and ``fleet``."""
    rng = np.random.default_rng(0)

    def valid(update_id: str, **kw) -> dict:  # shadows the module's, for this model and fleet
        return _valid(update_id, **{"spec": spec, "fleet": fleet, **kw})

    def with_tensor(update_id: str, **kw) -> bytes:
        return _with_tensor(update_id, spec, fleet, **kw)

    good = msgpack.packb(valid("truncated"))
    first = spec.tensors[0]
    n = spec.num_parameters

    def compact_slots(update_id: str, **kw) -> list:  # shadows the module's, for this model and fleet
        return _compact_slots(update_id, **{"spec": spec, "fleet": fleet, **kw})

    def compact_payload(update_id: str, **kw) -> bytes:
        return _compact_payload(update_id, **{"spec": spec, "fleet": fleet, **kw})

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * 1024 * 1024))  # ~2 KiB that inflate to 64 MiB
    cases: dict[str, tuple[str, bytes]] = {
        "empty": ("mallory", b""),
        "random-1": ("mallory", rng.bytes(1)),
        "random-4k": ("mallory", rng.bytes(4096)),
        "truncated-half": ("mallory", good[: len(good) // 2]),
        "truncated-one": ("mallory", good[:-1]),
        "not-a-map": ("mallory", msgpack.packb([1, 2, 3])),
        "deep-nesting": ("mallory", b"\x91" * 200_000 + b"\xc0"),  # [[[[...nil...]]]] 200k levels
        "huge-array-header": ("mallory", b"\xdd" + struct.pack(">I", 2**32 - 1)),  # array32 of 4G items, no items
        "huge-bin-header": ("mallory", msgpack.packb(valid("huge-bin"))[:-200] + b"\xc6" + struct.pack(">I", 2**32 - 1)),
        "huge-map-header": ("mallory", b"\xdf" + struct.pack(">I", 2**32 - 1)),
        "ext-type": ("mallory", msgpack.packb({"update_id": msgpack.ExtType(5, b"x")})),
        "decompression-bomb": ("mallory", with_tensor("decompression-bomb", codec="zstd", data=bomb)),
        "wrong-dtype-f64": ("mallory", with_tensor("wrong-dtype-f64", dtype="f64", data=b"\0" * 8 * math.prod(first.shape))),
        "wrong-dtype-object": ("mallory", with_tensor("wrong-dtype-object", dtype="object")),
        "overflowing-shape": ("mallory", with_tensor("overflowing-shape", shape=[2**62, 2**62])),
        "negative-shape": ("mallory", with_tensor("negative-shape", shape=[-16, -8])),
        "many-dims": ("mallory", with_tensor("many-dims", shape=[1] * 1000)),
        "shape-as-string": ("mallory", with_tensor("shape-as-string", shape="16x8")),
        "unknown-codec": ("mallory", with_tensor("unknown-codec", codec="rot13")),
        "nan": ("mallory", msgpack.packb(valid("nan", fill=math.nan))),
        "inf": ("mallory", msgpack.packb(valid("inf", fill=-math.inf))),
        "negative-samples": ("mallory", msgpack.packb(valid("negative-samples", num_samples=-5))),
        "zero-samples": ("mallory", msgpack.packb(valid("zero-samples", num_samples=0))),
        "absurd-samples": ("mallory", msgpack.packb(valid("absurd-samples", num_samples=10**12))),
        "float-samples": ("mallory", msgpack.packb(valid("float-samples", num_samples=1e300))),
        "bool-samples": ("mallory", msgpack.packb(valid("bool-samples", num_samples=True))),
        "future-schema": ("mallory", msgpack.packb(valid("future-schema", schema=2))),
        "no-schema": ("mallory", msgpack.packb({k: v for k, v in valid("no-schema").items() if k != "schema"})),
        "wrong-fleet": ("mallory", msgpack.packb(valid("wrong-fleet", fleet="elsewhere"))),
        "speaks-for-another": ("mallory", msgpack.packb(valid("speaks-for-another", client="agent-0"))),
        "unknown-client": ("stranger", msgpack.packb(valid("unknown-client", client="stranger"))),
        "tensors-as-map": ("mallory", msgpack.packb(valid("tensors-as-map", tensors={"a": 1}))),
        "missing-tensor": ("mallory", msgpack.packb({**valid("missing-tensor"), "tensors": valid("x")["tensors"][:1]})),
        "duplicate-tensor": ("mallory", msgpack.packb({**valid("duplicate-tensor"), "tensors": valid("x")["tensors"][:1] * 2})),
        "huge-update-id": ("mallory", msgpack.packb(valid("x" * 100_000))),
        "oversized": ("mallory", msgpack.packb(valid("oversized", padding=b"\0" * max_bytes))),
        # the compact form (fedge_contract.compact) and the Rice-coded positions of a top-k chain
        "compact-short": ("mallory", msgpack.packb(compact_slots("compact-short")[:-1])),
        "compact-rice-bomb": ("mallory", compact_payload("compact-rice-bomb", codec="flat+topk:0.1+rice+q4+zstd", data=bomb)),
        "compact-rice-garbage": ("mallory", compact_payload("compact-rice-garbage", codec="flat+topk:0.1+rice+sign", data=rng.bytes(40))),
        "compact-rice-past-the-end": ("mallory", compact_payload(
            "compact-rice-past-the-end", codec="flat+topk:0.1+rice+sign", data=bytes([0]) + b"\0" * (n // 8) + b"\xff" * 2 + b"\0" * 12)),
        "compact-sign-nan": ("mallory", compact_payload(
            "compact-sign-nan", codec="flat+sign", data=np.full(-(-n // 256), np.nan, "<f4").tobytes() + b"\0" * -(-n // 8))),
        "compact-speaks-for-another": ("mallory", msgpack.packb(compact_slots("compact-speaks-for-another", slots={"client_id": "agent-0"}))),
        "compact-metrics-as-map": ("mallory", msgpack.packb(compact_slots("compact-metrics-as-map", slots={"metrics": {"loss": 1.0}}))),
    }
    return cases


def compact_slots(ident: str, *, spec: ModelSpec = SPEC, fleet: str = FLEET, chain: str = "flat+topk:0.1+rice+sign",
                  slots: dict | None = None) -> list:
    """A valid compact Update (client mallory, update id ``ident``) as its array, with ``slots`` replaced by name."""
    delta = {t.name: np.linspace(-1, 1, int(np.prod(t.shape)), dtype=np.float32).reshape(t.shape) for t in spec.tensors}
    update = Update(fleet, "mallory", ident, 1, 0, 10, encode_weights(delta, parse_chain(chain)), metrics={"loss": 0.5})
    raw = msgpack.unpackb(update.to_bytes(compact=True), raw=False)
    for name, value in (slots or {}).items():
        raw[UPDATE_FIELDS.index(name)] = value
    return raw


def compact_payload(ident: str, *, codec: str, data: bytes, spec: ModelSpec = SPEC, fleet: str = FLEET) -> bytes:
    """A compact flat Update of ``spec``'s size whose one tensor holds ``data`` under ``codec``."""
    n = spec.num_parameters
    name, shape = ("*", [n]) if parse_chain(codec).flat else (spec.tensors[0].name, list(spec.tensors[0].shape))
    return msgpack.packb(compact_slots(ident, spec=spec, fleet=fleet, chain=codec, slots={"codec": codec, "tensors": [[name, shape, data]]}))


_valid, _with_tensor, _compact_slots, _compact_payload = valid, with_tensor, compact_slots, compact_payload


def outcome(client: str, payload: bytes) -> str:
    """"accepted" or the rejection's reason code; any other exception fails the test."""
    try:
        decode_delta(parse_update(payload, topic_client=client, fleet=FLEET, limits=LIMITS), SPEC)
    except Rejection as rejection:
        code = rejection.reason.split(":", 1)[0]
        assert code in REASONS, rejection.reason
        return code
    return "accepted"


def test_a_clean_update_is_accepted():
    assert outcome("mallory", msgpack.packb(valid())) == "accepted"
    assert outcome("mallory", msgpack.packb(compact_slots("compact"))) == "accepted"
    assert outcome("agent-0", msgpack.packb(valid(client="agent-0", codec="f16+zstd"))) == "accepted"


@pytest.mark.parametrize("name", sorted(corpus()))
def test_every_nasty_payload_is_a_typed_rejection(name):
    client, payload = corpus()[name]
    assert outcome(client, payload) != "accepted", name


def test_specific_reasons():
    cases = corpus()
    expected = {
        "unknown-client": "unknown_client", "speaks-for-another": "client_mismatch", "wrong-fleet": "wrong_fleet",
        "future-schema": "schema", "nan": "non_finite", "absurd-samples": "bad_value", "oversized": "too_large",
        "overflowing-shape": "bad_tensor", "compact-short": "wrong_type", "compact-rice-bomb": "bad_tensor",
        "compact-rice-garbage": "bad_tensor", "compact-rice-past-the-end": "bad_tensor", "compact-sign-nan": "non_finite",
        "compact-speaks-for-another": "client_mismatch", "compact-metrics-as-map": "wrong_type",
    }
    assert {name: outcome(*cases[name]) for name in expected} == expected


def test_decompression_bomb_never_inflates():
    client, payload = corpus()["decompression-bomb"]
    tracemalloc.start()
    try:
        outcome(client, payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while refusing a 64 MiB bomb"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_valid_updates_never_escape(data):
    payload = bytearray(msgpack.packb(valid("mutant")))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    outcome("mallory", bytes(payload[:cut]))  # accepted (a harmless flip) or a typed rejection


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from([*valid(), "extra"]), msgpack_values, max_size=12))
def test_structurally_random_updates_never_escape(fields):
    raw = {**valid("random"), **fields}
    outcome("mallory", msgpack.packb(raw))


@settings(max_examples=300, deadline=None)
@given(slots=st.dictionaries(st.sampled_from(UPDATE_FIELDS), msgpack_values, max_size=12))
def test_structurally_random_compact_updates_never_escape(slots):
    outcome("mallory", msgpack.packb(compact_slots("random", slots=slots)))

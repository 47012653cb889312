"""Chunked messages: manifests round-trip and decode strictly; only a complete, verified set of
chunks ever yields a payload (fedge_contract/chunks.py)."""

from __future__ import annotations

import json
import random
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract import DecodeError, Reason, Update
from fedge_contract.chunks import (
    MAX_CHUNKS,
    Busy,
    ChunkLimits,
    Manifest,
    Reassembler,
    assemble,
    digest_of,
    is_manifest,
    split,
)
from fedge_contract.codecs import encode_weights, parse_chain

FLEET = "f1"
BIG = 10**9


def manifest_of(payload: bytes, chunk_size: int, **overrides: Any) -> Manifest:
    identity = {"kind": "update", "client_id": "agent-1", "update_id": "u1"}
    identity.update(overrides)
    return Manifest.of(payload, fleet=FLEET, chunk_size=chunk_size, **identity)


def wire(manifest: Manifest, **overrides: Any) -> bytes:
    """The manifest as the plain map on the wire, with fields replaced (or removed with ...)."""
    obj = msgpack.unpackb(manifest.to_bytes(), raw=False)
    for key, value in overrides.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    return msgpack.packb(obj, use_bin_type=True)


def refused(payload: bytes, reason: Reason, *, max_size: int = BIG, **kw: Any) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        Manifest.from_bytes(payload, max_size=max_size, fleet=FLEET, **kw)
    assert caught.value.reason is reason, caught.value
    return caught.value


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(min_size=1, max_size=3000), chunk_size=st.integers(1, 700), algorithm=st.sampled_from(["sha256", "blake2b"]),
       seed=st.integers(0, 2**32 - 1))
def test_split_then_reassemble_in_any_order_gives_the_payload_back(payload: bytes, chunk_size: int, algorithm: str, seed: int) -> None:
    pieces = split(payload, chunk_size)
    manifest = Manifest.of(payload, fleet=FLEET, kind="global", chunk_size=chunk_size, hash=algorithm, model_version=7)
    assert manifest.count == len(pieces) == -(-len(payload) // chunk_size)
    assert b"".join(pieces) == payload and all(len(p) == manifest.chunk_length(i) for i, p in enumerate(pieces))
    decoded = Manifest.from_bytes(manifest.to_bytes(), max_size=len(payload), fleet=FLEET)
    assert decoded == manifest
    assert assemble(decoded, dict(enumerate(pieces))) == payload

    reassembler = Reassembler(ChunkLimits(max_size=len(payload)))
    assert reassembler.start("k", decoded)
    order = list(range(len(pieces)))
    random.Random(seed).shuffle(order)
    results = [reassembler.add("k", i, pieces[i]) for i in order]
    assert results[:-1] == [None] * (len(pieces) - 1)  # a partial set never yields anything
    assert results[-1] == payload
    assert "k" not in reassembler  # done: nothing held


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(min_size=2, max_size=2000), chunk_size=st.integers(1, 300), data=st.data())
def test_a_partial_set_never_yields_a_payload(payload: bytes, chunk_size: int, data: st.DataObject) -> None:
    pieces = split(payload, chunk_size)
    manifest = manifest_of(payload, chunk_size)
    present = data.draw(st.sets(st.integers(0, len(pieces) - 1), max_size=len(pieces) - 1))
    reassembler = Reassembler(ChunkLimits(max_size=BIG))
    reassembler.start("k", manifest)
    for index in sorted(present):
        assert reassembler.add("k", index, pieces[index]) is None
        assert reassembler.add("k", index, pieces[index]) is None  # a duplicate changes nothing
    assert "k" in reassembler and reassembler.received("k") == sum(len(pieces[i]) for i in present)
    with pytest.raises(DecodeError) as caught:
        assemble(manifest, {i: pieces[i] for i in present})
    assert caught.value.reason is Reason.INCOMPLETE


def test_is_manifest_tells_a_manifest_from_the_messages() -> None:
    manifest = manifest_of(b"x" * 100, 40)
    update = Update(FLEET, "agent-1", "u1", 1, 0, 10, encode_weights({"w": np.zeros(4, "f4")}, parse_chain("none")))
    assert is_manifest(manifest.to_bytes())
    for other in (update.to_bytes(), b"", b"manifest", json.dumps({"type": "manifest"}).encode(), msgpack.packb(["manifest"]),
                  msgpack.packb({"type": "manifesto"}), bytes(range(256))):
        assert not is_manifest(other), other


# ---------------------------------------------------------------- strict decoding


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"schema": 2}, Reason.SCHEMA),
        ({"type": "update"}, Reason.WRONG_TYPE),
        ({"fleet": "elsewhere"}, Reason.WRONG_FLEET),
        ({"kind": "model"}, Reason.BAD_VALUE),
        ({"size": ...}, Reason.MISSING_FIELD),
        ({"chunks": ...}, Reason.MISSING_FIELD),
        ({"digest": ...}, Reason.MISSING_FIELD),
        ({"update_id": ...}, Reason.MISSING_FIELD),
        ({"size": "100"}, Reason.WRONG_TYPE),
        ({"chunk_size": 40.0}, Reason.WRONG_TYPE),
        ({"chunks": "abc"}, Reason.WRONG_TYPE),
        ({"size": 0}, Reason.BAD_VALUE),
        ({"chunk_size": 0}, Reason.BAD_VALUE),
        ({"chunk_size": -1}, Reason.BAD_VALUE),
        ({"hash": "md5"}, Reason.BAD_VALUE),  # only hashes the receiver can trust
        ({"update_id": "a/b"}, Reason.BAD_VALUE),  # it names a topic level: no '/', '+' or '#'
        ({"client_id": "+"}, Reason.BAD_VALUE),
        ({"size": 121}, Reason.BAD_VALUE),  # 121 bytes in chunks of 40 make 4 chunks, 3 are listed: wrong sizes
        ({"chunk_size": 60}, Reason.BAD_VALUE),  # 100 bytes in 60-byte chunks make 2, not 3
        ({"digest": b"short"}, Reason.BAD_VALUE),  # a bad hash
        ({"digest": "0" * 64}, Reason.WRONG_TYPE),
    ],
)
def test_manifest_decoding_is_strict(overrides: dict[str, Any], reason: Reason) -> None:
    refused(wire(manifest_of(b"x" * 100, 40), **overrides), reason)


def test_a_bad_chunk_hash_in_the_list_is_refused() -> None:
    manifest = manifest_of(b"x" * 100, 40)
    refused(wire(manifest, chunks=[manifest.chunks[0], b"\0" * 31, manifest.chunks[2]]), Reason.BAD_VALUE)
    refused(wire(manifest, chunks=[manifest.chunks[0], 5, manifest.chunks[2]]), Reason.WRONG_TYPE)
    refused(wire(manifest, chunks=[*manifest.chunks, manifest.chunks[0]]), Reason.BAD_VALUE)  # an extra chunk


def test_oversize_total_and_too_many_chunks_are_refused_before_anything_is_fetched() -> None:
    manifest = manifest_of(b"x" * 100, 40)
    error = refused(manifest.to_bytes(), Reason.TOO_LARGE, max_size=99)
    assert "100 bytes exceeds the limit of 99" in error.detail
    refused(manifest.to_bytes(), Reason.TOO_LARGE, max_chunks=2)
    # a manifest claiming a huge payload in tiny chunks is refused from its size fields alone
    refused(wire(manifest, size=10**12, chunk_size=1), Reason.TOO_LARGE, max_size=10**13)
    assert MAX_CHUNKS * 34 < 256 * 1024  # the largest legal manifest fits MAX_MANIFEST_BYTES
    refused(b"\x80" + b"\0" * (300 * 1024), Reason.TOO_LARGE)
    refused(b"\xc1 not msgpack", Reason.MALFORMED)


def test_a_global_manifest_names_a_version_and_an_update_manifest_its_sender() -> None:
    global_manifest = Manifest.of(b"m" * 10, fleet=FLEET, kind="global", chunk_size=4, model_version=3)
    assert Manifest.from_bytes(global_manifest.to_bytes(), max_size=10).model_version == 3
    refused(wire(global_manifest, model_version=-1), Reason.BAD_VALUE)
    refused(wire(global_manifest, model_version=None), Reason.WRONG_TYPE)
    with pytest.raises(ValueError):
        Manifest.of(b"m", fleet=FLEET, kind="global", chunk_size=4)  # no version
    with pytest.raises(ValueError):
        Manifest.of(b"", fleet=FLEET, kind="update", chunk_size=4, client_id="a", update_id="b")


# ---------------------------------------------------------------- assembling


def test_assemble_refuses_missing_extra_corrupt_and_wrong_size_chunks() -> None:
    payload = bytes(range(250))
    manifest = manifest_of(payload, 100)
    pieces = dict(enumerate(split(payload, 100)))
    cases = {
        "missing": ({0: pieces[0], 2: pieces[2]}, Reason.INCOMPLETE),
        "extra": ({**pieces, 3: b"x" * 50}, Reason.BAD_CHUNK),
        "corrupt": ({**pieces, 1: b"\xff" + pieces[1][1:]}, Reason.BAD_CHUNK),
        "short": ({**pieces, 2: pieces[2][:-1]}, Reason.BAD_CHUNK),
        "swapped": ({**pieces, 0: pieces[1], 1: pieces[0]}, Reason.BAD_CHUNK),
    }
    for name, (chunks, reason) in cases.items():
        with pytest.raises(DecodeError) as caught:
            assemble(manifest, chunks)
        assert caught.value.reason is reason, name
    lying = Manifest(**{**manifest.__dict__, "digest": digest_of("sha256", b"something else")})
    with pytest.raises(DecodeError, match="the whole does not match") as caught:
        assemble(lying, pieces)
    assert caught.value.reason is Reason.BAD_CHUNK


def test_a_bad_chunk_is_never_stored_and_the_set_can_still_complete() -> None:
    payload = bytes(range(200))
    pieces = split(payload, 64)
    manifest = manifest_of(payload, 64)
    reassembler = Reassembler(ChunkLimits(max_size=BIG))
    reassembler.start("k", manifest)
    reassembler.add("k", 0, pieces[0])
    for index, bad in ((1, b"\0" * 64), (1, pieces[1][:-1]), (3, pieces[2]), (4, pieces[0]), (-1, pieces[0])):
        with pytest.raises(DecodeError) as caught:
            reassembler.add("k", index, bad)
        assert caught.value.reason is Reason.BAD_CHUNK
    assert reassembler.received("k") == 64
    assert [reassembler.add("k", i, pieces[i]) for i in (1, 2, 3)] == [None, None, payload]


def test_a_lying_whole_hash_drops_the_set() -> None:
    payload = bytes(range(100))
    manifest = Manifest(**{**manifest_of(payload, 50).__dict__, "digest": bytes(32)})
    reassembler = Reassembler(ChunkLimits(max_size=BIG))
    reassembler.start("k", manifest)
    assert reassembler.add("k", 0, payload[:50]) is None
    with pytest.raises(DecodeError, match="whole"):
        reassembler.add("k", 1, payload[50:])
    assert "k" not in reassembler


# ---------------------------------------------------------------- limits


def test_a_stalled_set_is_dropped_after_the_timeout_without_progress() -> None:
    clock = FakeClock()
    payload = bytes(300)
    pieces = split(payload, 100)
    reassembler = Reassembler(ChunkLimits(max_size=BIG, timeout=10.0), clock=clock)
    reassembler.start("k", manifest_of(payload, 100))
    assert reassembler.next_deadline() == 1010.0
    clock.now = 1008.0
    reassembler.add("k", 0, pieces[0])  # progress moves the deadline
    assert reassembler.next_deadline() == 1018.0
    clock.now = 1017.9
    assert reassembler.expire() == []
    clock.now = 1018.0
    [stalled] = reassembler.expire()
    assert stalled.key == "k" and stalled.received == 100 and stalled.error.reason is Reason.INCOMPLETE
    assert "2 chunks (1, 2) still missing after 10 s" in stalled.error.detail
    assert "k" not in reassembler and reassembler.next_deadline() is None


def test_limits_admit_within_count_and_bytes() -> None:
    limits = ChunkLimits(max_size=1000, max_concurrent=2, max_inflight_bytes=1500)
    reassembler = Reassembler(limits)
    small = [manifest_of(bytes([i]) * 700, 100, update_id=f"u{i}") for i in range(3)]
    assert reassembler.start("a", small[0]) and reassembler.start("b", small[1])
    assert reassembler.inflight_bytes == 1400
    with pytest.raises(Busy):
        reassembler.start("c", small[2])  # a third set: over max_concurrent
    reassembler.drop("b")
    with pytest.raises(Busy):
        reassembler.start("c", manifest_of(b"z" * 900, 100, update_id="u9"))  # 700 + 900 > 1500 bytes
    assert reassembler.start("c", small[2])
    with pytest.raises(DecodeError) as caught:
        Reassembler(limits).start("x", manifest_of(b"z" * 1001, 100))
    assert caught.value.reason is Reason.TOO_LARGE
    # one set is always admitted, even if it alone exceeds max_inflight_bytes
    assert Reassembler(ChunkLimits(max_size=10_000, max_inflight_bytes=10)).start("x", manifest_of(b"z" * 5000, 1000))


def test_the_same_manifest_again_keeps_its_chunks_and_another_one_replaces_them() -> None:
    payload = bytes(range(100))
    manifest = manifest_of(payload, 50)
    reassembler = Reassembler(ChunkLimits(max_size=BIG))
    reassembler.start("k", manifest)
    reassembler.add("k", 0, payload[:50])
    assert reassembler.start("k", manifest) is False and reassembler.received("k") == 50
    renewed = manifest_of(payload[::-1], 50)
    assert reassembler.start("k", renewed) is True and reassembler.received("k") == 0
    assert reassembler.add("k", 0, payload[::-1][:50]) is None
    assert reassembler.add("k", 1, payload[::-1][50:]) == payload[::-1]


def test_keyframe_and_delta_manifests_name_their_version() -> None:
    for kind, what in (("keyframe", "keyframe v4"), ("delta", "delta broadcast v4")):
        manifest = Manifest.of(b"m" * 10, fleet=FLEET, kind=kind, chunk_size=4, model_version=4)
        decoded = Manifest.from_bytes(manifest.to_bytes(), max_size=10)
        assert decoded == manifest and decoded.describe().startswith(what)
        refused(wire(manifest, model_version=None), Reason.WRONG_TYPE)
        with pytest.raises(ValueError):
            Manifest.of(b"m", fleet=FLEET, kind=kind, chunk_size=4)
    delta = Manifest.of(b"m" * 10, fleet=FLEET, kind="delta", chunk_size=4, model_version=4)
    refused(wire(delta, model_version=0), Reason.BAD_VALUE)  # no delta makes version 0

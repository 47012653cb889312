"""Shamir sharing: exactly the threshold rebuilds, one fewer refuses, and t - 1 shares say nothing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract.errors import Reason
from fedge_contract.secagg import shamir
from fedge_contract.secagg.errors import ParameterError, ProtocolError


def _random(seed: int) -> shamir.Randomness:
    return random.Random(seed).randbytes


def test_the_field_is_the_smallest_prime_above_2_256() -> None:
    sympy = pytest.importorskip("sympy")
    assert sympy.isprime(shamir.PRIME)
    assert sympy.nextprime(1 << 256) == shamir.PRIME


def test_exactly_threshold_shares_rebuild_and_one_fewer_is_refused() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, range(1, 11), 6, _random(1))
    chosen = {x: shares[x] for x in (2, 3, 5, 7, 8, 10)}
    assert shamir.reconstruct(chosen, 6, what="s") == secret
    del chosen[10]
    with pytest.raises(ProtocolError) as refused:
        shamir.reconstruct(chosen, 6, what="s")
    assert refused.value.reason is Reason.BELOW_THRESHOLD


def test_fewer_than_threshold_shares_are_consistent_with_every_secret() -> None:
    """Perfect secrecy, shown constructively: for any other secret, some polynomial of degree t - 1
    through it passes through the same t - 1 shares, so they cannot tell the two apart."""
    threshold = 5
    shares = shamir.split(b"\x11" * 32, range(1, 9), threshold, _random(2))
    seen = sorted(shares.items())[: threshold - 1]
    for other in (bytes(32), b"\xff" * 32, b"\x42" * 32):
        polynomial = shamir._Polynomial([(0, int.from_bytes(other, "big")), *seen])
        assert all(polynomial(x) == y for x, y in seen)
        rebuilt = shamir.reconstruct({100: polynomial(100), **dict(seen)}, threshold, what="s")
        assert rebuilt == other


def test_a_corrupted_share_is_detected_when_more_than_threshold_are_given() -> None:
    secret = b"\x07" * 32
    shares = shamir.split(secret, range(1, 8), 4, _random(3))
    shares[6] = (shares[6] + 1) % shamir.PRIME
    with pytest.raises(ProtocolError) as refused:
        shamir.reconstruct(shares, 4, what="s")
    assert refused.value.reason is Reason.BAD_SHARE


def test_shares_that_rebuild_no_32_byte_secret_are_refused() -> None:
    # a degree-0 "polynomial" with f(0) = 2^256 (a field element, but no 32-byte secret)
    with pytest.raises(ProtocolError) as refused:
        shamir.reconstruct({1: 1 << 256, 2: 1 << 256}, 2, what="s")
    assert refused.value.reason is Reason.BAD_SHARE


@pytest.mark.parametrize(
    ("secret", "xs", "threshold"),
    [(b"short", [1, 2], 2), (bytes(32), [1, 2], 3), (bytes(32), [1, 1, 2], 2), (bytes(32), [0, 1], 2), (bytes(32), [1, 2], 0)],
)
def test_impossible_sharings_are_parameter_errors(secret: bytes, xs: list[int], threshold: int) -> None:
    with pytest.raises(ParameterError):
        shamir.split(secret, xs, threshold, _random(4))


def test_share_encoding_is_33_bytes_and_strict() -> None:
    assert shamir.share_from_bytes(shamir.share_to_bytes(shamir.PRIME - 1), what="s") == shamir.PRIME - 1
    for bad in (bytes(32), shamir.PRIME.to_bytes(33, "big"), b"\xff" * 33):
        with pytest.raises(ProtocolError) as refused:
            shamir.share_from_bytes(bad, what="s")
        assert refused.value.reason is Reason.BAD_SHARE


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.integers(2, 30),
    data=st.data(),
)
def test_any_threshold_subset_rebuilds_the_secret(secret: bytes, holders: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, holders), label="threshold")
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=holders, max_size=holders, unique=True), label="xs")
    shares = shamir.split(secret, xs, threshold, _random(data.draw(st.integers(0, 2**32), label="seed")))
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, unique=True), label="subset")
    assert shamir.reconstruct({x: shares[x] for x in subset}, threshold, what="s") == secret
    if threshold > 1:
        with pytest.raises(ProtocolError):
            shamir.reconstruct({x: shares[x] for x in subset[: threshold - 1]}, threshold, what="s")

"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

2^256 + 297 is the smallest prime above 2^256, so every 32-byte secret (an X25519 private key,
a mask seed) is one field element, and a share is one element: 33 bytes. A share is the pair
(x, f(x)) of a random polynomial f of degree t - 1 with f(0) = secret; any t shares determine f,
and any t - 1 are consistent with every secret equally (perfect secrecy). The x coordinates are
public (a device's position in the round's member list, from 1); only f(x) travels.

Reconstruction with more than t shares also checks that the extra shares lie on the same
polynomial, so a corrupted share is detected rather than silently producing a wrong secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedge_contract.errors import Reason
from fedge_contract.secagg.crypto import KEY_BYTES, Randomness
from fedge_contract.secagg.errors import ParameterError, ProtocolError

PRIME = (1 << 256) + 297
SHARE_BYTES = 33


def _random_element(random: Randomness) -> int:
    """A uniform field element by rejection: 257 random bits, kept when below the prime (about half the time)."""
    while True:
        candidate = int.from_bytes(random(SHARE_BYTES), "big") & ((1 << 257) - 1)
        if candidate < PRIME:
            return candidate


def split(secret: bytes, xs: Iterable[int], threshold: int, random: Randomness) -> dict[int, int]:
    """Shares of ``secret`` at each of ``xs`` (distinct, 1 <= x < PRIME): any ``threshold`` of them rebuild it."""
    points = list(xs)
    if len(secret) != KEY_BYTES:
        raise ParameterError(f"secrets are {KEY_BYTES} bytes, got {len(secret)}")
    if threshold < 1 or threshold > len(points):
        raise ParameterError(f"threshold {threshold} needs 1 <= threshold <= {len(points)} shares")
    if len(set(points)) != len(points) or not all(0 < x < PRIME for x in points):
        raise ParameterError("share points must be distinct and in 1..PRIME-1")
    coefficients = [int.from_bytes(secret, "big")] + [_random_element(random) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in points}


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):  # Horner
        value = (value * x + c) % PRIME
    return value


class _Polynomial:
    """The polynomial through ``points``, evaluated anywhere by Lagrange: the denominators are inverted
    once, and each evaluation costs O(t) with prefix and suffix products of (at - x_j)."""

    def __init__(self, points: list[tuple[int, int]]) -> None:
        self.xs = [x for x, _ in points]
        self.weights = []
        for i, (xi, yi) in enumerate(points):
            denominator = 1
            for j, xj in enumerate(self.xs):
                if i != j:
                    denominator = denominator * (xi - xj) % PRIME
            self.weights.append(yi * pow(denominator, -1, PRIME) % PRIME)

    def __call__(self, at: int) -> int:
        factors = [(at - x) % PRIME for x in self.xs]
        prefix = [1]
        for f in factors[:-1]:
            prefix.append(prefix[-1] * f % PRIME)
        total, suffix = 0, 1
        for i in range(len(factors) - 1, -1, -1):
            total = (total + self.weights[i] * prefix[i] * suffix) % PRIME
            suffix = suffix * factors[i] % PRIME
        return total


def reconstruct(shares: Mapping[int, int], threshold: int, *, what: str) -> bytes:
    """The secret behind ``shares`` (x -> y); ProtocolError below ``threshold`` or if the shares disagree."""
    if threshold < 1:
        raise ParameterError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ProtocolError(Reason.BELOW_THRESHOLD, f"{what}: {len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())
    if not all(0 < x < PRIME and 0 <= y < PRIME for x, y in points):
        raise ProtocolError(Reason.BAD_SHARE, f"{what}: a share outside the field")
    polynomial = _Polynomial(points[:threshold])
    for x, y in points[threshold:]:
        if polynomial(x) != y:
            raise ProtocolError(Reason.BAD_SHARE, f"{what}: share at x={x} is not on the polynomial of the others")
    secret = polynomial(0)
    if secret >= 1 << (8 * KEY_BYTES):
        raise ProtocolError(Reason.BAD_SHARE, f"{what}: the shares rebuild a value that is no {KEY_BYTES}-byte secret")
    return secret.to_bytes(KEY_BYTES, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes, *, what: str) -> int:
    if len(data) != SHARE_BYTES:
        raise ProtocolError(Reason.BAD_SHARE, f"{what}: a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ProtocolError(Reason.BAD_SHARE, f"{what}: share outside the field")
    return y

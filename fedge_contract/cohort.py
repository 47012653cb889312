"""Who takes part in a round, as the announcement (GlobalModel) says it: the invited cohort and the
devices asked to evaluate.

Two sets, two encodings, because they need different things:

- **The cohort** (who trains) is picked by the aggregator from the devices that are eligible now,
  fairly over time (aggregator/rounds/cohort.py). Neither rule can be recomputed by a device: it knows
  neither the eligible set nor the others' histories. So the announcement carries the set itself,
  as a *Golomb-coded set* (GCS, Golomb 1966; as in BIP 158): each invited client id is hashed
  (keyed by fleet and round) into ``[0, n * 2**p)``, the sorted hashes are sent as Rice-coded
  gaps, about ``p + 1.6`` bits per invited device whatever the length of its id. A device hashes
  its own id and looks it up. A device outside the cohort matches with probability ``2**-p``
  (the aggregator picks ``p`` from the fleet's size so that the whole fleet sees ~0.01 false
  invitations per round); a false match trains and is refused (``rejected: not_invited``) by the
  aggregator, which holds the exact list.
- **The evaluators** (who evaluates the announced model on its own held-out data) need no
  fairness and no exact count: a uniform sample is the point. The announcement carries only a
  threshold, and a device evaluates iff ``H(fleet, version, client id) < threshold``: ~5 bytes,
  and anyone can check a report's claim.

Only the aggregator may publish on ``global`` (the broker's ACL), so a forged cohort cannot reach
a device through the broker. The set is not secret (anyone can test an id against it): selection
privacy is not a goal (see the README, security).

An announcement without a cohort invites every device (aggregators before cohort selection). An
agent that predates cohorts ignores the field and trains anyway: its update is refused as not
invited.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedge_contract.errors import DecodeError, Reason

__all__ = [
    "EVAL_ALL",
    "MAX_COHORT",
    "InviteSet",
    "Participation",
    "eval_threshold",
    "invite_bits",
]

MAX_COHORT = 1_000_000  # invited devices per round a decoder accepts
MAX_BITS = 40  # Rice parameter bound: 2**40 buckets per device is far beyond any fleet
EVAL_ALL = 1 << 32  # an eval threshold that asks every device
_INVITE_PERSON = b"fedge-invite-v1"
_EVAL_PERSON = b"fedge-eval-v1"


def _hash64(person: bytes, fleet: str, number: int, client_id: str) -> int:
    """64 bits of BLAKE2b over (fleet, number, client id), domain-separated by ``person``."""
    digest = hashlib.blake2b(digest_size=8, person=person)
    digest.update(fleet.encode())
    digest.update(b"\0")
    digest.update(number.to_bytes(8, "big"))
    digest.update(client_id.encode())
    return int.from_bytes(digest.digest(), "big")


def invite_bits(population: int, false_invites: float = 0.01) -> int:
    """The Rice parameter ``p`` at which ``population`` devices see ~``false_invites`` false matches a round."""
    if population < 1 or not false_invites > 0:
        raise ValueError("population must be >= 1 and false_invites > 0")
    return min(MAX_BITS, max(1, math.ceil(math.log2(population / false_invites))))


@dataclass(frozen=True)
class InviteSet:
    """The invited client ids of one round, as a Golomb-coded set: ``count`` hashes, Rice parameter ``bits``."""

    count: int
    bits: int
    data: bytes

    @classmethod
    def of(cls, client_ids: Iterable[str], *, fleet: str, round_no: int, bits: int) -> InviteSet:
        ids = sorted(set(client_ids))
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be 1-{MAX_BITS}, got {bits}")
        if len(ids) > MAX_COHORT:
            raise ValueError(f"a cohort of {len(ids)} exceeds {MAX_COHORT}")
        modulus = len(ids) << bits
        values = sorted(_hash64(_INVITE_PERSON, fleet, round_no, c) % modulus for c in ids) if ids else []
        return cls(len(ids), bits, _rice_encode(values, bits))

    def hashes(self) -> list[int]:
        """The sorted hashes (decoding checks every bound: this never reads past the data)."""
        return _rice_decode(self.data, self.count, self.bits)

    @functools.cached_property
    def _lookup(self) -> frozenset[int]:
        return frozenset(self.hashes())

    def contains(self, client_id: str, *, fleet: str, round_no: int) -> bool:
        if self.count == 0:
            return False
        return _hash64(_INVITE_PERSON, fleet, round_no, client_id) % (self.count << self.bits) in self._lookup

    def to_wire(self) -> dict[str, Any]:
        return {"n": self.count, "p": self.bits, "set": self.data}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any], where: str) -> InviteSet:
        count, bits, data = obj.get("n"), obj.get("p"), obj.get("set")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_COHORT:
            raise DecodeError(Reason.BAD_VALUE, f"{where}.n must be an integer 0-{MAX_COHORT}")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
            raise DecodeError(Reason.BAD_VALUE, f"{where}.p must be an integer 1-{MAX_BITS}")
        if not isinstance(data, bytes):
            raise DecodeError(Reason.WRONG_TYPE, f"{where}.set must be bin")
        invite = cls(count, bits, data)
        invite.hashes()  # strict: a set that does not decode to exactly n values is refused here, not at lookup
        return invite


def eval_threshold(fraction: float) -> int:
    """The announced threshold asking a ``fraction`` (0-1) of devices to evaluate."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"eval fraction must be in [0, 1], got {fraction}")
    return round(fraction * EVAL_ALL)


@dataclass(frozen=True)
class Participation:
    """The announcement's ``cohort`` field: who trains this round, and who evaluates the announced model.

    ``invited`` None: every device trains (no selection). ``eval_threshold`` None: nobody is asked
    to evaluate.
    """

    invited: InviteSet | None = None
    eval_threshold: int | None = None

    def invites(self, client_id: str, *, fleet: str, round_no: int) -> bool:
        return self.invited is None or self.invited.contains(client_id, fleet=fleet, round_no=round_no)

    def asks_eval(self, client_id: str, *, fleet: str, model_version: int) -> bool:
        if self.eval_threshold is None:
            return False
        return (_hash64(_EVAL_PERSON, fleet, model_version, client_id) >> 32) < self.eval_threshold

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.invited is None else self.invited.to_wire()
        if self.eval_threshold is not None:
            out["eval"] = self.eval_threshold
        return out

    @classmethod
    def from_wire(cls, obj: object, where: str = "cohort") -> Participation:
        if not isinstance(obj, dict):
            raise DecodeError(Reason.WRONG_TYPE, f"{where} must be a map")
        unknown = set(obj) - {"n", "p", "set", "eval"}
        if unknown:
            raise DecodeError(Reason.BAD_VALUE, f"{where} has unknown keys {sorted(map(str, unknown))}")
        invited = InviteSet.from_wire(obj, where) if {"n", "p", "set"} & set(obj) else None
        threshold = obj.get("eval")
        if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or not 0 <= threshold <= EVAL_ALL):
            raise DecodeError(Reason.BAD_VALUE, f"{where}.eval must be an integer 0-{EVAL_ALL}")
        return cls(invited, threshold)


# ---------------------------------------------------------------------- Rice coding of sorted values


def _rice_encode(values: list[int], bits: int) -> bytes:
    """Gaps of sorted ``values``: each as its quotient in unary (q ones, a zero) and ``bits`` low bits."""
    parts, previous = [], 0
    for value in values:
        gap = value - previous
        previous = value
        parts.append("1" * (gap >> bits) + "0" + format(gap & ((1 << bits) - 1), f"0{bits}b"))
    text = "".join(parts)
    if not text:
        return b""
    text += "0" * (-len(text) % 8)
    return int(text, 2).to_bytes(len(text) // 8, "big")


def _rice_decode(data: bytes, count: int, bits: int) -> list[int]:
    text = format(int.from_bytes(data, "big"), f"0{len(data) * 8}b") if data else ""
    limit = count << bits
    values, pos, previous = [], 0, 0
    for i in range(count):
        stop = text.find("0", pos)
        if stop < 0 or stop + 1 + bits > len(text):
            raise DecodeError(Reason.BAD_VALUE, f"cohort set ends after {i} of {count} values")
        gap = ((stop - pos) << bits) | int(text[stop + 1:stop + 1 + bits], 2)
        previous += gap
        if previous >= limit:
            raise DecodeError(Reason.BAD_VALUE, f"cohort set value {i} is out of range")
        values.append(previous)
        pos = stop + 1 + bits
    rest = text[pos:]
    if len(rest) >= 8 or "1" in rest:
        raise DecodeError(Reason.BAD_VALUE, "cohort set has trailing data")
    return values

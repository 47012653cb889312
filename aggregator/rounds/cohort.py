"""Cohort selection: which devices a round invites, fairly over time, seeded and reproducible.

Pure logic (no I/O, no clock); the round loop feeds it the fleet's presence and persists its state.

**The rule.** Each round invites ``ceil(target x over_select)`` devices from the *pool*: the
devices whose retained presence says online and eligible (an agent too old to report eligibility
counts as eligible). Only when the pool is too small are online devices that are not eligible
right now invited too (they train once they are), and after them the known offline devices (in a
fleet no larger than the cohort, a device that is reconnecting or restarting: every known device is
invited, as before cohorts). In a fleet larger than the cohort an offline device is never invited.

Within the pool the draw is weighted sampling without replacement (Efraimidis and Spirakis 2006):
device ``i`` gets the key ``log(u_i) / w_i`` and the largest keys win, where

- ``u_i`` is uniform in (0, 1), derived from ``BLAKE2b(seed, round, client id)``: the same seed and
  inputs give the same cohort in any order, on any machine, after any restart;
- ``w_i = min(age_i, cap)``, ``age_i`` the rounds since the device was last invited (never: the
  cap), ``cap = max(2, 2 x ceil(pool / size))`` unless set. A device invited last round has
  weight 1 and one left out for a whole cycle the cap: recently used devices are less likely,
  and nobody waits forever.

The key draw is the same distribution as drawing devices one by one with probability
proportional to weight, which gives each round's *sampling rate* for differential privacy: the
largest probability any device had of being invited, bounded by
``sum_{k<m} w_max / (W - k w_max)`` (each successive draw picks ``i`` with probability at most
``w_i`` over what is left, and at most ``k`` devices of weight at most ``w_max`` are gone after
``k`` draws). It is an upper bound, which is what the accountant needs (epsilon grows with q).

**Extensions** invite more devices into an open round (after dropouts): the next keys of the same
draw among pool devices not invited yet, so an extension never re-invites and a replay
reproduces it.

**State** is plain values (``to_state``/``from_state``: JSON-able), so a restarted aggregator
re-announces the same cohort for its open round and keeps everyone's history.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedge_contract import Presence
from fedge_contract.cohort import InviteSet, Participation, invite_bits

__all__ = [
    "Candidate",
    "CohortPolicy",
    "CohortSelector",
    "Selection",
    "candidates",
    "extension_size",
]

STATE_VERSION = 1
_PERSON = b"fedge-cohort-key"


@dataclass(frozen=True)
class Candidate:
    """A device as its retained presence describes it."""

    client_id: str
    online: bool = True
    eligible: bool = True


def candidates(devices: Mapping[str, Presence]) -> list[Candidate]:
    """The aggregator's last presence of each device, as candidates (unknown eligibility counts as eligible)."""
    return [Candidate(client, p.state == "online", p.eligible is not False) for client, p in devices.items()]


@dataclass(frozen=True)
class CohortPolicy:
    target: int  # updates that close a round
    over_select: float = 1.3  # invite this many times the target (dropouts, stragglers)
    seed: int = 0
    max_weight: int | None = None  # cap on rounds-since-last-invited; None: 2 x ceil(pool / size)
    false_invites: float = 0.01  # expected false matches of the announced set per round, fleet-wide (fedge_contract.cohort)

    def __post_init__(self) -> None:
        if self.target < 1 or not 1 <= self.over_select <= 100 or (self.max_weight is not None and self.max_weight < 1):
            raise ValueError(f"need target >= 1, 1 <= over_select <= 100 and max_weight >= 1: {self}")

    @property
    def size(self) -> int:
        """Devices invited per round: ceil(target x over_select)."""
        return math.ceil(self.target * self.over_select - 1e-9)


@dataclass(frozen=True)
class Selection:
    """One round's cohort: who is invited, and the largest probability any device had of it."""

    round: int
    invited: frozenset[str]
    sampling_rate: float  # upper bound on any pool device's probability of being invited this round (DP's q)
    pool: int  # devices it was drawn from
    extensions: int = 0

    def announcement(self, fleet: str, population: int, *, eval_threshold: int | None = None, false_invites: float = 0.01) -> Participation:
        """The GlobalModel's ``cohort`` field for this selection (``population``: devices known, for the set's precision)."""
        bits = invite_bits(max(population, len(self.invited), 1), false_invites)
        return Participation(InviteSet.of(self.invited, fleet=fleet, round_no=self.round, bits=bits), eval_threshold)


def extension_size(policy: CohortPolicy, accepted: int, outstanding: int) -> int:
    """Devices to invite on an extension: enough that the invited devices still expected to answer
    (``outstanding``: invited, online, no update yet) are over_select x the updates still missing."""
    missing = max(0, policy.target - accepted)
    return max(0, math.ceil(missing * policy.over_select - 1e-9) - outstanding)


@dataclass
class CohortSelector:
    """Selects each round's cohort and remembers who was invited when (see the module docstring)."""

    policy: CohortPolicy
    last_invited: dict[str, int] = field(default_factory=dict)  # client -> last round it was invited to
    invitations: dict[str, int] = field(default_factory=dict)  # client -> rounds it was invited to
    current: Selection | None = None  # the newest round's selection (re-announced as is after a restart)
    rates: dict[int, float] = field(default_factory=dict)  # round -> sampling rate (DP accounting)

    def select(self, round_no: int, devices: Iterable[Candidate]) -> Selection:
        """The cohort of ``round_no``; asking again for the same round returns the same selection."""
        if self.current is not None and self.current.round == round_no:
            return self.current
        if self.current is not None and round_no < self.current.round:
            raise ValueError(f"round {round_no} is before the last selected round {self.current.round}")
        pool = self._pool(list(devices), exclude=frozenset())
        chosen, rate = self._draw(round_no, pool, self.policy.size, already=0)
        return self._commit(Selection(round_no, frozenset(chosen), rate, len(pool[0])))

    def extend(self, round_no: int, devices: Iterable[Candidate], count: int) -> Selection:
        """Invite up to ``count`` more devices into ``round_no`` (never one invited already)."""
        current = self.current
        if current is None or current.round != round_no:
            raise ValueError(f"round {round_no} has no selection to extend")
        if count <= 0:
            return current
        pool = self._pool(list(devices), exclude=current.invited)
        chosen, rate = self._draw(round_no, pool, count, already=len(current.invited))
        if not chosen:
            return current
        # A device is invited by the first draw or by this one: the union bound adds their rates.
        rate = min(1.0, current.sampling_rate + rate)
        return self._commit(Selection(round_no, current.invited | frozenset(chosen), rate, current.pool, current.extensions + 1), new=chosen)

    def invited(self, round_no: int) -> frozenset[str] | None:
        """The exact invited set of ``round_no`` if it is the newest selected round, else None."""
        return self.current.invited if self.current is not None and self.current.round == round_no else None

    def max_invitations(self) -> int:
        """The most rounds any device was invited to: what a privacy accountant that assumes the
        cohort is public (it is announced) composes over."""
        return max(self.invitations.values(), default=0)

    # ------------------------------------------------------------------ the draw
    def _pool(self, devices: list[Candidate], exclude: frozenset[str]) -> tuple[list[str], list[str], list[str]]:
        """Eligible online devices; the online ineligible ones that fill in when there are too few of those;
        then the known offline ones (a small fleet's device that is reconnecting, restarting)."""
        seen = {c.client_id: c for c in devices if c.client_id not in exclude}
        eligible = sorted(c for c, d in seen.items() if d.online and d.eligible)
        return (eligible, sorted(c for c, d in seen.items() if d.online and not d.eligible),
                sorted(c for c, d in seen.items() if not d.online))

    def _weight(self, client: str, round_no: int, cap: int) -> int:
        last = self.last_invited.get(client)
        return cap if last is None else max(1, min(round_no - last, cap))

    def _cap(self, pool_size: int) -> int:
        return self.policy.max_weight or max(2, 2 * math.ceil(pool_size / self.policy.size))

    def _draw(self, round_no: int, pool: tuple[list[str], ...], count: int, *, already: int) -> tuple[list[str], float]:
        """The ``count`` best keys of the eligible devices, filled up from the next tiers' best keys; the draw's rate."""
        eligible = pool[0]
        if count <= 0 or not any(pool):
            return [], 0.0
        cap = self._cap(len(eligible) + already)  # an extension over the same pool keeps the first draw's weights and keys
        chosen: list[str] = []
        for tier in pool:
            chosen += self._best(tier, round_no, cap, count - len(chosen))
        return chosen, self._rate([self._weight(c, round_no, cap) for c in eligible], count)

    def _best(self, clients: list[str], round_no: int, cap: int, count: int) -> list[str]:
        return sorted(clients, key=lambda c: (-self._key(c, round_no, cap), c))[:max(count, 0)]

    def _key(self, client: str, round_no: int, cap: int) -> float:
        digest = hashlib.blake2b(digest_size=8, person=_PERSON)
        digest.update(self.policy.seed.to_bytes(8, "big", signed=True))
        digest.update(round_no.to_bytes(8, "big"))
        digest.update(client.encode())
        u = (int.from_bytes(digest.digest(), "big") + 0.5) / 2**64
        return math.log(u) / self._weight(client, round_no, cap)

    @staticmethod
    def _rate(weights: list[int], count: int) -> float:
        """Upper bound on any device's inclusion probability when ``count`` of ``weights`` are drawn by weight."""
        if count >= len(weights):
            return 1.0 if weights else 0.0  # every eligible device is in (the ineligible fill-ins cannot train until they are)
        total, top = float(sum(weights)), float(max(weights))
        bound = 0.0
        for k in range(count):
            left = total - k * top
            if left <= top:
                return 1.0
            bound += top / left
        return min(1.0, bound)

    def _commit(self, selection: Selection, new: Iterable[str] | None = None) -> Selection:
        for client in (selection.invited if new is None else new):
            self.last_invited[client] = selection.round
            self.invitations[client] = self.invitations.get(client, 0) + 1
        self.current = selection
        self.rates[selection.round] = selection.sampling_rate
        return selection

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """Plain values (JSON-able) that ``from_state`` turns back into this selector."""
        current = None
        if self.current is not None:
            c = self.current
            current = {"round": c.round, "invited": sorted(c.invited), "sampling_rate": c.sampling_rate, "pool": c.pool, "extensions": c.extensions}
        return {
            "version": STATE_VERSION, "seed": self.policy.seed, "last_invited": dict(self.last_invited),
            "invitations": dict(self.invitations), "current": current, "rates": {str(k): v for k, v in self.rates.items()},
        }

    @classmethod
    def from_state(cls, policy: CohortPolicy, state: Mapping[str, Any] | None) -> CohortSelector:
        if not state:
            return cls(policy)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"cohort state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("seed") != policy.seed:
            raise ValueError(f"cohort state was drawn with seed {state.get('seed')}, not {policy.seed}: keep the seed of the run")
        c = state.get("current")
        current = None
        if c is not None:
            current = Selection(int(c["round"]), frozenset(c["invited"]), float(c["sampling_rate"]), int(c["pool"]), int(c["extensions"]))
        return cls(
            policy,
            last_invited={str(k): int(v) for k, v in state["last_invited"].items()},
            invitations={str(k): int(v) for k, v in state["invitations"].items()},
            current=current,
            rates={int(k): float(v) for k, v in state.get("rates", {}).items()},
        )

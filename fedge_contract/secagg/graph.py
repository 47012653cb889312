"""The SecAgg+ neighbourhood graph: each device shares its secrets with, and masks against, only k others.

The graph is a Harary graph H(k, n) on a shuffled cycle: the round's members are ordered by
SHA-256(seed || id) (the seed is published by the server with the member list), and each member's
neighbours are the k/2 nearest on either side of that cycle. Everyone derives the same graph from
the published seed and members, and a device checks that the keys it is handed are exactly its
neighbours'. With n - 1 <= k the graph is complete (plain SecAgg, Bonawitz et al. 2017).
Bell et al. 2020 show k = O(log n) neighbours suffice for privacy and dropout tolerance against
a random graph; DESIGN.md gives the k and threshold we recommend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedge_contract.secagg.crypto import DOMAIN
from fedge_contract.secagg.errors import ParameterError

SEED_BYTES = 32


@dataclass(frozen=True)
class Graph:
    members: tuple[str, ...]  # sorted, unique
    degree: int  # the announced k (even); the effective degree is min(k, n - 1)
    seed: bytes
    _neighbours: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if list(self.members) != sorted(set(self.members)):
            raise ParameterError("graph members must be sorted and unique")
        if self.degree < 2 or self.degree % 2:
            raise ParameterError(f"the neighbourhood degree must be even and >= 2, got {self.degree}")
        if len(self.seed) != SEED_BYTES:
            raise ParameterError(f"the graph seed is {SEED_BYTES} bytes, got {len(self.seed)}")
        object.__setattr__(self, "_neighbours", _harary(self.members, self.degree, self.seed))
        object.__setattr__(self, "_index", {m: i + 1 for i, m in enumerate(self.members)})

    @property
    def effective_degree(self) -> int:
        return min(self.degree, len(self.members) - 1)

    def neighbours(self, member: str) -> frozenset[str]:
        try:
            return self._neighbours[member]
        except KeyError:
            raise ParameterError(f"{member!r} is not a member of the graph") from None

    def index(self, member: str) -> int:
        """The member's public share point: its position in the sorted member list, from 1."""
        try:
            return self._index[member]
        except KeyError:
            raise ParameterError(f"{member!r} is not a member of the graph") from None


def _harary(members: Sequence[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    n = len(members)
    if n - 1 <= degree:
        everyone = frozenset(members)
        return {m: everyone - {m} for m in members}
    cycle = sorted(members, key=lambda m: (hashlib.sha256(DOMAIN + b"/graph" + seed + m.encode()).digest(), m))
    half = degree // 2
    return {
        m: frozenset(cycle[(i + step) % n] for step in range(-half, half + 1) if step)
        for i, m in enumerate(cycle)
    }

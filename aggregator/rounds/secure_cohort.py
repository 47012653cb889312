"""Who a secure round invites, until cohort selection (issue 15, ``rounds/cohort.py``) reaches the sync policy.

A secure session needs its cohort named in its Setup before anyone advertises keys, so a secure
round cannot take whoever sends an update, as a plain round does. ``online_eligible`` invites the
devices whose retained presence says online and eligible (unknown eligibility counts as eligible),
at most ``cap`` of them (the round's target x 1.3, as cohort selection over-selects); when more are
available, a seeded hash of (round, client) picks which, so every device takes its turn and a
restarted aggregator picks the same ones from the same presence. ``SecurePolicy`` takes any
``CohortSource``: cohort selection replaces this one by passing its own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

from aggregator.observability.fleet import FleetView

CohortSource = Callable[[int], list[str]]  # round -> the devices to invite if the session opened now (sorted)
OVER_SELECT = 1.3  # invite up to this many times the target: some devices drop out mid-protocol


def cohort_cap(target: int) -> int:
    """The most devices a round with ``target`` invites."""
    return max(target, math.ceil(target * OVER_SELECT))


def online_eligible(fleet: FleetView, cap: int, seed: int = 0, allowed: frozenset[str] | None = None) -> CohortSource:
    """The online, eligible devices of ``fleet``'s presence (only ``allowed`` ones, if given: ``--allow-clients``),
    at most ``cap`` (a seeded, per-round choice among more)."""

    def cohort(round_no: int) -> list[str]:
        pool = [client for client in fleet.online if (p := fleet.devices.get(client)) is not None and p.eligible is not False
                and (allowed is None or client in allowed)]
        if len(pool) > cap:
            pool = sorted(pool, key=lambda c: hashlib.blake2b(f"{seed}:{round_no}:{c}".encode(), digest_size=8).digest())[:cap]
        return sorted(pool)

    return cohort

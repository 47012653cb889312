"""Round modes: what a round is, who may join it, when it ends.

    policy.py    the protocol the coordinator runs every mode through (RoundPolicy, Round, Admission)
    sync.py      synchronous rounds: deadline, target, minimum, extensions (the default)
    cohort.py    the cohort selection rule (pure, seeded); invitations.py: its place in sync rounds
    buffered.py  FedBuff: a buffer of staleness-weighted updates, a new version every buffer_size
    secure.py    secure aggregation (issue 17): synchronous rounds whose sum a SecAgg+ session computes
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aggregator.rounds.buffered import BufferedPolicy
from aggregator.rounds.invitations import Fleet, Invitations
from aggregator.rounds.policy import Accepted, Admission, DeadlineAction, Round, RoundPolicy, RoundServices, Sampling
from aggregator.rounds.sync import SyncPolicy

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig

__all__ = [
    "Accepted", "Admission", "BufferedPolicy", "DeadlineAction", "Round", "RoundPolicy", "RoundServices", "Sampling", "SyncPolicy",
    "make_policy",
]


def make_policy(config: AggregatorConfig, fleet: Fleet | None = None) -> RoundPolicy:
    """The round mode ``config`` asks for; a sync mode with a cohort selects from ``fleet`` (the coordinator's FleetView)."""
    settings = config.rounds
    if settings.mode == "async":
        return BufferedPolicy(settings.buffer_plan, settings.staleness)
    if settings.secure_aggregation:
        from aggregator.rounds.secure import SecurePolicy  # the protocol's crypto is imported only when asked for

        return SecurePolicy.of(config)
    cohort = settings.cohort
    if cohort is None:
        return SyncPolicy(settings.plan)
    if fleet is None:
        raise ValueError("cohort selection needs the fleet view (or over_select 0)")
    return SyncPolicy(settings.plan, Invitations(cohort, fleet, checkin=settings.checkin))

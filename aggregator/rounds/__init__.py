"""Round modes: what a round is, who may join it, when it ends.

    policy.py    the protocol the coordinator runs every mode through (RoundPolicy, Round, Admission)
    sync.py      synchronous rounds: deadline, target, minimum, extensions (the default)
    buffered.py  FedBuff: a buffer of staleness-weighted updates, a new version every buffer_size
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aggregator.rounds.buffered import BufferedPolicy
from aggregator.rounds.policy import Accepted, Admission, DeadlineAction, Round, RoundPolicy, RoundServices
from aggregator.rounds.sync import SyncPolicy

if TYPE_CHECKING:
    from aggregator.config import RoundSettings

__all__ = [
    "Accepted", "Admission", "BufferedPolicy", "DeadlineAction", "Round", "RoundPolicy", "RoundServices", "SyncPolicy", "make_policy",
]


def make_policy(settings: RoundSettings) -> RoundPolicy:
    """The round mode ``settings`` ask for."""
    if settings.mode == "async":
        return BufferedPolicy(settings.buffer_plan, settings.staleness)
    return SyncPolicy(settings.plan)

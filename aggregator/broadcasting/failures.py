"""When devices' presence asks for a keyframe: catch-up failures seen across the fleet.

An agent that cannot reach an announced version (edge_agent/held_model.py: its catch-up failed its
hashes again, or the retained topics it needs stayed silent, or what it fetched was damaged) says
why in its retained presence (``why_not``, the refusal's ``reason: detail``) and trains on nothing
until the next announcement. One device failing may be its own trouble (a link that drops every
transfer); several failing since the current keyframe point at the broker's copy: retained
messages lost or damaged, a keyframe whose chain no longer rebuilds. A new keyframe at the next
version is then cheap insurance: with snapshot keyframes followers never download it, and it
replaces what catch-up starts from.

The rule (README: delta broadcasts, keyframes on demand): a keyframe is requested once
``max(MIN_DEVICES, ceil(SHARE x devices online))`` distinct devices report a catch-up failure
since the current keyframe, or every online device when fewer are online (a fleet of one heals
too). A device whose later presence says something else (it caught up) no longer counts; taking
the keyframe starts the count again. Failures that a keyframe cannot heal (a model of another
architecture, a model larger than the device accepts) are not counted.
"""

from __future__ import annotations

import math

from fedge_contract import Presence

__all__ = ["FAILURE_REASONS", "MIN_DEVICES", "SHARE", "CatchUpFailures"]

# The refusal reasons of broadcast material that is missing or damaged (fedge_contract.errors.Reason values)
FAILURE_REASONS = ("hash_mismatch", "incomplete", "bad_chunk", "bad_tensor", "malformed", "codec")
MIN_DEVICES = 2
SHARE = 0.01


def is_catch_up_failure(presence: Presence | None) -> bool:
    """Whether ``presence`` reports that its device could not reach an announced version for a reason a keyframe heals."""
    if presence is None or presence.state != "online":
        return False
    reason = presence.why_not.split(":", 1)[0].strip()
    return reason in FAILURE_REASONS


class CatchUpFailures:
    """Counts the devices reporting a catch-up failure since the current keyframe; ``due`` says when to ask for one."""

    def __init__(self) -> None:
        self.failing: set[str] = set()  # devices whose last presence reports a failure, since the current keyframe
        self.requested = False  # a keyframe was asked for and not taken yet

    def threshold(self, online: int) -> int:
        return max(1, min(online, max(MIN_DEVICES, math.ceil(SHARE * online))))

    def on_presence(self, client: str, presence: Presence | None, online: int) -> bool:
        """A device's presence changed; True once a keyframe should be requested (once per keyframe)."""
        if is_catch_up_failure(presence):
            self.failing.add(client)
        else:
            self.failing.discard(client)
        if self.requested or not self.failing or len(self.failing) < self.threshold(online):
            return False
        self.requested = True
        return True

    def keyframe_taken(self) -> None:
        """A new keyframe went out: failures reported before it are forgotten."""
        self.failing.clear()
        self.requested = False

"""Scheduled faults: "cut agent-7 for 20 s at round 3", "cut agents-0 for 5 s 10 s after start".

A spec is a comma-separated list of ``LINK@WHEN+SECONDS[!]`` where WHEN is ``rN`` (when round N
opens, as told by ``FaultProxy.notify_round``) or ``tN`` (N seconds after the proxy started), and
SECONDS is the length of the black hole (``inf`` = for the rest of the run). A trailing ``~``
keeps the connections alive through the cut (a blip TCP rides out) instead of resetting them
when it heals (both ends gave up, as MQTT keepalives would). A second kind, ``LINK@rN^SECONDS``,
cuts the link the moment it starts its next upload (an upstream chunk of at least
``link.UPLOAD_BYTES`` or carrying fedge's update topic) once round N is open: a device that vanishes mid-upload. ``LINK@rN>SECONDS`` lets
that upload through and cuts at the first bytes coming back: the upload arrived but its
acknowledgement and receipt are lost, so the device sends it again (a QoS 1 redelivery).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_FAULT = re.compile(r"^(?P<link>[A-Za-z0-9._-]+)@(?P<kind>[rt])(?P<at>\d+(?:\.\d+)?)(?P<op>[+^>])(?P<secs>inf|\d+(?:\.\d+)?)(?P<keep>~?)$")


@dataclass(frozen=True)
class Fault:
    link: str
    seconds: float  # length of the black hole; math.inf = until the proxy heals everything
    at_round: int | None = None  # trigger: round N opens ...
    at_time: float | None = None  # ... or N seconds after the proxy started
    on_upload: bool = False  # wait for the link's next upload after the trigger, then cut
    deliver_upload: bool = False  # with on_upload: let the upload through, cut at its acknowledgement
    reset_after: bool = True  # reset the link's connections when the cut heals

    def __post_init__(self) -> None:
        if (self.at_round is None) == (self.at_time is None):
            raise ValueError("a fault needs exactly one of at_round / at_time")
        if not self.seconds > 0:
            raise ValueError("a cut must last > 0 s")

    def __str__(self) -> str:
        when = f"r{self.at_round}" if self.at_round is not None else f"t{self.at_time:g}"
        op = (">" if self.deliver_upload else "^") if self.on_upload else "+"
        return f"{self.link}@{when}{op}{self.seconds:g}{'' if self.reset_after else '~'}"


def parse_schedule(spec: str) -> list[Fault]:
    """Parse ``agent-7@r3+20,agents-0@t10+5~,agent-2@r4^inf`` (see the module docstring)."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _FAULT.match(item)
        if match is None:
            raise ValueError(f"bad fault {item!r}: expected LINK@rN+SECONDS or LINK@tN+SECONDS, or LINK@rN^SECONDS / LINK@rN>SECONDS, optionally ending in ~")
        at = float(match["at"])
        faults.append(Fault(
            link=match["link"],
            seconds=math.inf if match["secs"] == "inf" else float(match["secs"]),
            at_round=int(at) if match["kind"] == "r" else None,
            at_time=at if match["kind"] == "t" else None,
            on_upload=match["op"] in "^>",
            deliver_upload=match["op"] == ">",
            reset_after=not match["keep"],
        ))
    return faults

"""Scheduled faults: "cut agent-7 for 20 s at round 3", "cut agent-0 for 5 s, 10 s after start".

A spec is a comma-separated list of faults, each ``LINK@WHEN OP SECONDS [~]`` (no spaces):

- WHEN is ``rN`` (when round N opens, as told by ``FaultProxy.notify_round``) or ``tN`` (N s
  after the schedule was given); SECONDS is the length of the black hole (``inf``: until
  ``heal()``/``heal_all()``).
- OP ``+`` cuts the link then. ``^`` waits for the link's next upload (an upstream chunk of at
  least ``link.UPLOAD_BYTES`` or carrying fedge's update topic) and cuts before it gets through:
  a device vanishing mid-upload. ``>`` lets that upload through and cuts at the first bytes
  coming back: the upload arrived but its PUBACK and receipt are lost, so the device sends it
  again (a QoS 1 redelivery the aggregator must dedupe).
- A trailing ``~`` keeps the connections through the cut (a blip TCP rides out); by default they
  are reset when it heals (both ends gave up, as MQTT keepalives would).

Examples: ``agent-7@r3+20``, ``agent-2@t30+5~``, ``agent-4@r2^inf``, ``agent-1@r2>0.3``.
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
            raise ValueError(f"bad fault {item!r}: expected LINK@rN+SECONDS or LINK@tN+SECONDS, "
                             "or LINK@rN^SECONDS / LINK@rN>SECONDS, optionally ending in ~")
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

"""Network fault injection for fleets: a TCP proxy between agents and the broker.

``FaultProxy`` (proxy.py) owns links (link.py), each a loopback port forwarding to the broker
with a ``LinkProfile`` (profiles.py: latency, jitter, bandwidth, random resets) and scheduled
black holes (schedule.py). Used by ``fedge simulate --network`` and by the ``fault_proxy``
pytest fixture; usable in any user's tests.
"""

from fedge.netem.link import Link, LinkStats
from fedge.netem.profiles import PROFILES, LinkProfile, profile
from fedge.netem.proxy import FaultProxy
from fedge.netem.schedule import Fault, parse_schedule

__all__ = ["PROFILES", "Fault", "FaultProxy", "Link", "LinkProfile", "LinkStats", "parse_schedule", "profile"]

"""The fleet as the aggregator sees it: each device's last retained presence.

Devices publish their presence (online or offline, eligible or why not, their readings) retained,
with a last will that says offline. The coordinator hands every presence message here; the
dashboard's fleet table, the online gauge and the fleet's count of updates devices dropped
unanswered (a device's ``dropped``, issue 19) read from it, and parts that react to what devices
report ``watch`` it (delta broadcasts count catch-up failures: aggregator/broadcasting/failures.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from aggregator.observability.metrics import AggregatorMetrics
from fedge_contract import DecodeError, Presence

log = logging.getLogger("fedge.aggregator")


class FleetView:
    def __init__(self, fleet: str, metrics: AggregatorMetrics) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self.online: set[str] = set()
        self.devices: dict[str, Presence] = {}  # last presence of each device
        self._watchers: list[Callable[[str, Presence | None], None]] = []

    def watch(self, watcher: Callable[[str, Presence | None], None]) -> None:
        """Call ``watcher(client, presence)`` after every presence (None: cleared or unreadable)."""
        self._watchers.append(watcher)

    def on_presence(self, client: str, payload: bytes) -> None:
        try:
            presence = Presence.from_bytes(payload, fleet=self.fleet)
        except DecodeError as exc:
            if payload:  # an empty retained message clears presence: not an error
                log.warning("bad presence from %s: %s", client, exc)
            self.online.discard(client)
            self.devices.pop(client, None)
        else:
            (self.online.add if presence.state == "online" else self.online.discard)(client)
            earlier = self.devices.get(client)
            if earlier is not None and earlier.dropped > presence.dropped:  # a will made at an earlier connect: the count
                presence = dataclasses.replace(presence, dropped=earlier.dropped)  # is a lifetime total, it never goes down
            self.devices[client] = presence
        self.metrics.online_agents(len(self.online))
        self.metrics.dropped_updates(sum(p.dropped for p in self.devices.values()))
        for watcher in self._watchers:
            watcher(client, self.devices.get(client))

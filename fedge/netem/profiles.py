"""Link profiles: what a network does to the bytes crossing it.

Named profiles give ``fedge simulate --network`` and tests a realistic starting point; explicit
knobs override any field. Figures are one-way delays and rough orders of magnitude of what
devices see (a home LAN, a busy Wi-Fi, a mobile link in poor coverage), not measurements of a
particular network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkProfile:
    """One direction's behaviour, applied to both directions of every connection of a link."""

    latency_ms: float = 0.0  # added one-way delay
    jitter_ms: float = 0.0  # each chunk's delay is latency +- U(0, jitter), never reordering bytes
    bandwidth_kbps: float = 0.0  # cap per direction and connection, kilobits per second; 0 = unlimited
    reset_prob: float = 0.0  # probability that a forwarded chunk is lost with its connection (TCP RST)

    def __post_init__(self) -> None:
        if min(self.latency_ms, self.jitter_ms, self.bandwidth_kbps) < 0:
            raise ValueError("latency, jitter and bandwidth must be >= 0")
        if not 0.0 <= self.reset_prob < 1.0:
            raise ValueError("reset_prob must be in [0, 1)")

    def with_overrides(self, **overrides: float | None) -> LinkProfile:
        """This profile with every non-None override applied."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def is_clean(self) -> bool:
        return self == LinkProfile()


PROFILES: dict[str, LinkProfile] = {
    "lan": LinkProfile(latency_ms=0.5, jitter_ms=0.2),
    "wifi": LinkProfile(latency_ms=5.0, jitter_ms=3.0, bandwidth_kbps=50_000),
    "cellular": LinkProfile(latency_ms=60.0, jitter_ms=25.0, bandwidth_kbps=5_000),
    # a device at the edge of coverage: slow, and one chunk in 50 takes its connection down
    "flaky": LinkProfile(latency_ms=120.0, jitter_ms=80.0, bandwidth_kbps=1_000, reset_prob=0.02),
}


def profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown network profile {name!r} (known: {', '.join(PROFILES)})") from None

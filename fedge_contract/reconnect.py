"""When a disconnected program tries its broker again, and how long a device may take to come back.

Issue 19: capped full-jitter backoff on the attempt count (``U(0, min(cap, base * 2**n))``) kept
agents away 7.5-15.7 s after a broker that was down 2.5 s. Refused attempts are instant, so a few
short draws run the attempt count up and the next draw may be the whole cap, however short the
outage was. The aggregator, sized for a prompt return, closed the round without them.

So the window grows with the time offline instead, as a share of it::

    delay = U(0, window),  window = min(cap, max(base, growth * offline_for))

- A short outage costs a short wait: the next attempt after the broker returns comes within
  ``window(outage)``, 1 s after an outage of up to 2 s, 1.25 s after 2.5 s, half the outage
  after longer ones. No run of bad draws can stretch it: a draw near 0 adds no offline time.
- A broker that stays down is tried ever more rarely, up to every ``cap`` seconds (30 s); a
  fleet of N devices then reconnects spread over ``cap``, at most 2N/cap per second when the
  broker returns (full jitter's densest point), instead of N at once.
- ``offline_for`` counts from the end of the last connection that lived ``stable_after`` seconds
  (AWS IoT SDKs' ``minConnectedTimeToResetReconnectDelay``). A connection the broker drops at
  once (a session taken over by a second device with the same id, a broker that accepts and
  falls over) does not reset the wait, so a flapping fleet backs off like a refused one.

paho and the AWS IoT SDKs double a delay per failed attempt (paho 1 s to 120 s without jitter,
AWS 1 s to 120 s with full jitter, reset after 30 s connected); aiomqtt leaves reconnecting to
its user. fedge keeps their full jitter and their stable-connection reset and grows the window
with time rather than attempts, which bounds the return after a short outage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FIRST_WINDOW = 1.0  # seconds: the window of the first attempts after a drop
GROWTH = 0.5  # the window grows by this share of the time already spent offline
CAP = 30.0  # seconds: the largest window, reached after cap / growth = 60 s offline
STABLE_AFTER = 10.0  # seconds a connection must live for its end to start a new outage
CONNECT_TIMEOUT = 10.0  # seconds one attempt may take (TCP, TLS, CONNACK): fedge_contract.mqtt_client's default


@dataclass
class Backoff:
    """The reconnect schedule: ``delay(offline_for)`` before the next attempt (see the module docstring).

    ``rng`` is injectable so tests are deterministic; the Connection injects its ``sleep`` and ``clock``.
    """

    base: float = FIRST_WINDOW
    cap: float = CAP
    rng: random.Random = field(default_factory=random.Random)
    growth: float = GROWTH
    stable_after: float = STABLE_AFTER

    def __post_init__(self) -> None:
        if not (0 < self.base <= self.cap) or self.growth < 0 or self.stable_after < 0:
            raise ValueError(f"backoff needs 0 < base <= cap, growth >= 0, stable_after >= 0: {self}")

    def window(self, offline_for: float) -> float:
        """The longest wait before the next attempt, ``offline_for`` seconds into an outage."""
        return min(self.cap, max(self.base, self.growth * offline_for))

    def delay(self, offline_for: float) -> float:
        """A wait drawn from ``[0, window(offline_for)]`` (full jitter)."""
        return self.rng.uniform(0.0, self.window(offline_for))

    def return_bound(self, outage: float | None = None, *, connect_timeout: float = CONNECT_TIMEOUT) -> float:
        """The longest a device takes to be connected again once a broker that was away ``outage`` seconds
        (as the device counted them; None: unknown) is back.

        An attempt started before the return may hang until its timeout (a SYN the dead host never
        answered), then wait at most one window: ``connect_timeout + window(outage + connect_timeout)``.
        A broker that restarts on a live host refuses at once, and the return is within ``window(outage)``.
        """
        if outage is None:
            return connect_timeout + self.cap
        return connect_timeout + self.window(outage + connect_timeout)


# The longest a device on the default schedule takes to reconnect after the broker returns, however
# long it was away: what the aggregator waits after it (re)connects before it may close a round
# without the devices that were away (issue 19). 40 s.
MAX_RETURN_DELAY = Backoff().return_bound()

"""Issue 19: a device comes back within a couple of seconds of a short broker outage.

The Connection's waits are injected (a sleep that advances a virtual clock), so these tests never
wait for real; its connect attempts are real ones, refused by a loopback port nobody listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.local import free_port
from edge_agent.config import AgentConfig
from fedge_contract.mqtt import MAX_RETURN_DELAY, Backoff, BrokerAddress, Connection, ConnectionLost, make_client
from fedge_contract.reconnect import CAP, CONNECT_TIMEOUT


class VirtualTime:
    """A clock that only the injected sleep advances; ``passed`` is set once it reaches ``until``."""

    def __init__(self, until: float) -> None:
        self.now = 0.0
        self.until = until
        self.sleeps: list[float] = []
        self.slept = asyncio.Event()
        self.passed = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.slept.set()
        self.now += seconds
        if self.now >= self.until:
            self.passed.set()
            await asyncio.Event().wait()  # the test has what it measured
        await asyncio.sleep(0)


def agent_backoff(seed: int) -> Backoff:
    """The schedule an agent runs with its default settings (edge_agent/agent.py builds it so)."""
    defaults = AgentConfig(broker=BrokerAddress("127.0.0.1", 1), client_id="device", state_dir=".")  # type: ignore[arg-type]
    return Backoff(defaults.backoff_base, defaults.backoff_cap, random.Random(seed))


async def return_delay(outage: float, backoff: Backoff) -> float:
    """Seconds between a broker's return after ``outage`` seconds away and the device's next connect attempt."""
    refused = BrokerAddress("127.0.0.1", free_port())  # nothing listens: every attempt is refused at once
    time = VirtualTime(until=outage)
    async with Connection(refused, "device", subscriptions=[], persistent=False, backoff=backoff, sleep=time.sleep, clock=time.clock):
        await time.passed.wait()
    return time.now - outage  # the next attempt starts when the sleep that crossed the return ends


@pytest.mark.timeout(60)
async def test_a_device_returns_within_two_seconds_of_a_short_outage():
    """The chaos run of issue 19: the broker was down 2.5 s, agents stayed away 7.5-15.7 s."""
    async with asyncio.timeout(50):
        delays = [await return_delay(2.5, agent_backoff(seed)) for seed in range(20)]
    assert max(delays) <= 2.0, sorted(delays)


class Upper:
    """An rng that always draws the top of the interval: the schedule's envelope."""

    def uniform(self, low: float, high: float) -> float:
        assert low == 0.0
        return high


class Drawn:
    """An rng that draws the given fractions of each interval, in turn: any sequence of bad luck."""

    def __init__(self, fractions: list[float]) -> None:
        self.fractions = itertools.cycle(fractions)

    def uniform(self, low: float, high: float) -> float:
        return low + next(self.fractions) * (high - low)


def test_the_window_starts_at_base_grows_with_the_time_offline_and_stops_at_the_cap():
    backoff = Backoff(base=1.0, cap=30.0, growth=0.5)
    assert [backoff.window(t) for t in (0, 1, 2, 2.5, 10, 59, 60, 3600)] == [1.0, 1.0, 1.0, 1.25, 5.0, 29.5, 30.0, 30.0]
    one, other = Backoff(rng=random.Random(7)), Backoff(rng=random.Random(7))
    delays = [one.delay(offline) for offline in range(0, 200, 5)]
    again = [other.delay(offline) for offline in range(0, 200, 5)]
    assert delays == again  # the injected rng makes it reproducible
    assert len(set(delays)) == len(delays)  # jittered
    assert all(0.0 <= d <= Backoff().window(offline) for d, offline in zip(delays, range(0, 200, 5), strict=True))


@pytest.mark.parametrize("bad", [dict(base=0.0), dict(base=2.0, cap=1.0), dict(growth=-1.0), dict(stable_after=-1.0)])
def test_a_schedule_that_makes_no_sense_is_refused(bad):
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(**bad)


@settings(max_examples=300)
@given(outage=st.floats(0.0, 600.0), fractions=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=20))
def test_no_run_of_draws_keeps_a_device_away_longer_than_one_window(outage, fractions):
    """The property the attempt-count backoff lacked: whatever the draws, the first attempt after the
    broker's return comes within window(outage) of it (attempts to a refused port take no time)."""
    backoff = Backoff(rng=Drawn(fractions))  # type: ignore[arg-type]
    offline = 0.0
    while offline < outage:
        offline += backoff.delay(offline)
    assert offline - outage <= backoff.window(outage) + 1e-9


def test_a_broker_that_stays_down_is_tried_ever_more_rarely_up_to_the_cap():
    backoff = Backoff(rng=Upper())  # type: ignore[arg-type]
    offline, delays = 0.0, []
    while offline < 600:
        delays.append(backoff.delay(offline))
        offline += delays[-1]
    assert delays[:5] == [1.0, 1.0, 1.0, 1.5, 2.25]
    assert delays == sorted(delays) and max(delays) == 30.0
    assert len(delays) < 35  # ten minutes down: fewer than 35 attempts per device (20 of them at the cap)


def test_the_return_bounds_the_aggregator_sizes_its_grace_from():
    backoff = Backoff()
    assert backoff.return_bound(2.5, connect_timeout=0.0) == 1.25  # a broker restarted on a live host refuses at once
    assert backoff.return_bound(2.5) == 10.0 + 6.25  # an attempt that hung on the dead host until its timeout
    assert backoff.return_bound() == MAX_RETURN_DELAY == CONNECT_TIMEOUT + CAP == 40.0
    assert all(backoff.return_bound(outage) <= MAX_RETURN_DELAY for outage in (0, 1, 60, 1e6))


def test_agents_run_the_schedule_the_exported_bound_describes():
    config = AgentConfig(broker=BrokerAddress("127.0.0.1", 1), client_id="device", state_dir=".")  # type: ignore[arg-type]
    assert (config.backoff_base, config.backoff_cap) == (Backoff().base, Backoff().cap)


async def wait_for_sleeps(time: VirtualTime, count: int) -> None:
    while len(time.sleeps) < count:
        time.slept.clear()
        await time.slept.wait()


@pytest.mark.integration
async def test_only_a_connection_that_lived_resets_the_wait(broker_address, fleet):
    """A device whose session another device takes over at once (same client id) backs off as if refused;
    a connection that lived ``stable_after`` seconds starts the schedule over."""
    time = VirtualTime(until=float("inf"))
    identifier = f"{fleet}-device"
    backoff = Backoff(1.0, 30.0, Upper(), stable_after=10.0)  # type: ignore[arg-type]

    async def kick() -> None:
        sleeps = len(time.sleeps)
        with contextlib.suppress(ConnectionLost):
            async with make_client(broker_address, identifier, persistent=False):
                pass  # the broker drops the device's connection for this one
        await wait_for_sleeps(time, sleeps + 1)
        await conn.wait_connected()  # it came back (and took the session back)

    async with asyncio.timeout(30):
        async with Connection(broker_address, identifier, subscriptions=[], persistent=False, backoff=backoff,
                              sleep=time.sleep, clock=time.clock) as conn:
            await conn.wait_connected()
            for _ in range(4):
                await kick()  # each connection lived 0 s (virtual): the outage goes on
            assert time.sleeps == [1.0, 1.0, 1.0, 1.5]
            time.now += 10.0  # this connection lives stable_after seconds
            await kick()
            assert time.sleeps[-1] == 1.0  # a new outage: the first window again, not window(4.5) = 2.25
            assert conn.connections == 6

"""FaultProxy against a local echo server: bytes, order, delays, caps, resets, cuts, schedules."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from fedge.netem import FaultProxy, LinkProfile, parse_schedule
from fedge.netem.link import UPLOAD_BYTES


class Echo:
    """Echoes every byte back and remembers what it received (and when, relative to a flag)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.flag = False  # set by a test; each chunk records whether it arrived after
        self.arrivals: list[bool] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
                self.arrivals.append(self.flag)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield server


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def test_a_clean_link_forwards_bytes_both_ways_unchanged(echo):
    payload = bytes(range(256)) * 1000
    async with asyncio.timeout(10), FaultProxy(seed=1) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        assert await roundtrip(link.port, payload) == payload
        stats = await link.wait_for(lambda s: s.open == 0)
    assert bytes(echo.received) == payload
    assert (stats.connections, stats.bytes_up, stats.bytes_down, stats.resets) == (1, len(payload), len(payload), 0)


async def test_latency_delays_each_direction_and_jitter_never_reorders(echo):
    async with asyncio.timeout(10), FaultProxy(seed=2) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port), LinkProfile(latency_ms=40, jitter_ms=40))
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        for i in range(200):  # many small writes, each with its own jittered delay
            writer.write(i.to_bytes(2, "big"))
            await writer.drain()
        echoed = await reader.readexactly(400)
        writer.close()
    assert [int.from_bytes(echoed[i : i + 2], "big") for i in range(0, 400, 2)] == list(range(200))
    assert link.stats.bytes_down == 400


async def test_a_round_trip_takes_at_least_twice_the_latency(echo):
    async with asyncio.timeout(10), FaultProxy(seed=3) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port), LinkProfile(latency_ms=60))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await roundtrip(link.port, b"ping")
        assert loop.time() - started >= 0.12


async def test_the_bandwidth_cap_spreads_a_transfer_over_its_serialisation_time(echo):
    payload = b"x" * 32_000  # 256 kbit at 2048 kbit/s: >= 0.125 s each way
    async with asyncio.timeout(10), FaultProxy(seed=4) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port), LinkProfile(bandwidth_kbps=2048))
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await roundtrip(link.port, payload) == payload
        assert loop.time() - started >= 2 * 256_000 / 2_048_000


async def chunks_until_reset(echo: Echo, seed: int) -> int:
    """Send 1-byte chunks, one round trip each, until the link resets the connection."""
    async with FaultProxy(seed=seed) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port), LinkProfile(reset_prob=0.1))
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        sent = 0
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            while True:
                writer.write(b"x")
                await writer.drain()
                await reader.readexactly(1)
                sent += 1
        writer.close()
        await link.wait_for(lambda s: s.resets >= 1 and s.open == 0)
        return sent


async def test_random_resets_drop_the_connection_with_a_seeded_rng(echo):
    async with asyncio.timeout(20):
        first = await chunks_until_reset(echo, seed=5)
        second = await chunks_until_reset(echo, seed=5)
    assert first == second  # the same seed makes the same choices
    assert first < 200  # p = 0.1 per chunk, each way


async def test_a_cut_holds_every_byte_until_it_heals_and_a_blip_keeps_the_connection(echo):
    async with asyncio.timeout(10), FaultProxy(seed=6) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        link.cut(math.inf, reset_after=False)
        writer.write(b"during")
        await writer.drain()
        echo.flag = True  # anything the echo server sees from now on arrived after the heal below
        link.heal()
        assert await reader.readexactly(6) == b"during"
        writer.close()
    assert echo.arrivals == [False, True]
    assert (link.stats.cuts, link.stats.cut_resets) == (1, 0)


async def test_a_cut_that_heals_resets_its_connections_and_new_ones_work(echo):
    async with asyncio.timeout(10), FaultProxy(seed=7) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        await link.wait_for(lambda s: s.open == 1)
        link.cut(0.05)
        writer.write(b"lost")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(4)
        writer.close()
        assert await roundtrip(link.port, b"again") == b"again"
    assert bytes(echo.received) == b"again"  # what was sent into the black hole never arrived
    assert (link.stats.cuts, link.stats.cut_resets) == (1, 1)


async def test_a_cut_with_reset_now_ends_its_connections_at_once_and_admits_none_until_it_heals(echo):
    async with asyncio.timeout(10), FaultProxy(seed=9) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        await link.wait_for(lambda s: s.open == 1)
        link.cut(math.inf, reset_now=True)
        with pytest.raises(ConnectionResetError):  # reset now, not when the cut heals
            await reader.read()
        writer.close()
        late = asyncio.create_task(roundtrip(link.port, b"late"))
        await link.wait_for(lambda s: s.connections == 2)
        assert not late.done() and echo.received == bytearray()  # a new connection gets nowhere during the cut
        link.heal()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await late  # reset when the cut heals, as any connection made during a cut
        assert await roundtrip(link.port, b"again") == b"again"
    assert (link.stats.cuts, link.stats.cut_resets) == (1, 2)


async def test_scheduled_faults_fire_at_their_round_or_time(echo):
    async with asyncio.timeout(10), FaultProxy(seed=8) as proxy:
        by_round = await proxy.add_link("agent-7", ("127.0.0.1", echo.port))
        by_time = await proxy.add_link("agent-8", ("127.0.0.1", echo.port))
        proxy.schedule(parse_schedule("agent-7@r3+inf, agent-8@t0.01+inf"))
        await by_time.wait_for(lambda s: s.cuts == 1)
        proxy.notify_round(2)
        assert not by_round.is_cut
        proxy.notify_round(3)
        assert by_round.is_cut
        proxy.notify_round(4)  # fires once
        assert by_round.stats.cuts == 1
        proxy.heal_all()
        assert not by_round.is_cut and not by_time.is_cut


async def test_an_upload_cut_swallows_the_upload_and_leaves_small_messages_alone(echo):
    async with asyncio.timeout(10), FaultProxy(seed=9) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        proxy.schedule(parse_schedule("a@r1^inf"))
        proxy.notify_round(1)
        assert await roundtrip(link.port, b"presence") == b"presence"
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"u" * UPLOAD_BYTES * 2)
        await link.wait_for(lambda s: s.cuts == 1)
        await proxy.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()
    assert bytes(echo.received) == b"presence"


async def test_a_small_upload_is_recognised_by_its_topic(echo):
    async with asyncio.timeout(10), FaultProxy(seed=12) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        link.cut_at_next_upload(math.inf)
        assert await roundtrip(link.port, b"fl/x/presence/a") == b"fl/x/presence/a"
        _reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"0fl/x/updates/a" + bytes(100))
        await link.wait_for(lambda s: s.cuts == 1)
        writer.close()
    assert bytes(echo.received) == b"fl/x/presence/a"


async def test_a_delivered_upload_loses_its_acknowledgement(echo):
    async with asyncio.timeout(10), FaultProxy(seed=11) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        proxy.schedule(parse_schedule("a@r1>inf"))
        proxy.notify_round(1)
        upload = b"u" * UPLOAD_BYTES * 2
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(upload)
        await link.wait_for(lambda s: s.cuts == 1)
        assert bytes(echo.received) == upload  # it arrived ...
        await proxy.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)  # ... but its echo (the "acknowledgement") never came back
        writer.close()
    assert link.stats.bytes_down == 0


async def test_the_proxy_closes_itself_after_its_lifetime(echo):
    async with asyncio.timeout(10), FaultProxy(seed=10, lifetime=0.05) as proxy:
        link = await proxy.add_link("a", ("127.0.0.1", echo.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        await proxy.wait_closed()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()
        with pytest.raises(ConnectionError):
            await roundtrip(link.port, b"x")


def test_only_loopback_addresses_are_allowed():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(host="0.0.0.0")


async def test_a_non_loopback_upstream_is_refused():
    async with FaultProxy() as proxy:
        with pytest.raises(ValueError, match="loopback"):
            await proxy.add_link("a", ("10.0.0.1", 1883))


@pytest.mark.parametrize(
    "spec, error",
    [("agent-7@3+20", "bad fault"), ("agent 7@r3+20", "bad fault"), ("a@r1+0", "> 0 s"), ("x@r1+1", "no link")],
)
async def test_bad_schedules_are_refused_with_a_clear_error(spec, error):
    async with FaultProxy() as proxy:
        with pytest.raises(ValueError, match=error):
            proxy.schedule(parse_schedule(spec))


def test_profiles_are_named_and_overridable():
    from fedge.netem import PROFILES, profile

    assert set(PROFILES) == {"lan", "wifi", "cellular", "flaky"}
    tuned = profile("cellular").with_overrides(latency_ms=10.0, reset_prob=None)
    assert (tuned.latency_ms, tuned.bandwidth_kbps) == (10.0, PROFILES["cellular"].bandwidth_kbps)
    with pytest.raises(ValueError, match="unknown network profile"):
        profile("dialup")
    with pytest.raises(ValueError, match="reset_prob"):
        LinkProfile(reset_prob=1.0)

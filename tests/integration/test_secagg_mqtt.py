"""Secure aggregation over a real Mosquitto: the agent's module on every device, the aggregator's relay
driven by a test loop standing in for the coordinator. Masks cancel, devices lost at each phase are
handled, too many lost abandons the session (and a retry counts everyone once), and a relay
restarted mid-protocol resumes from its checkpoint and spool or starts the round again."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from aggregator.secagg_relay import SecAggSettings, SecureMean
from fedge_contract.errors import Reason
from fedge_contract.secagg import Abandoned, MaskedInput, Phase, ResumeError, Reveal, Ring, Shares
from fedge_contract.tensors import ModelSpec
from tests.integration.secagg_fleet import (
    SPEC,
    TIMEOUTS,
    ModuleDevice,
    Store,
    announcement,
    coordinator,
    deltas,
    fedavg,
    retained_under,
    running,
)

pytestmark = pytest.mark.integration


def _ring_sum(devices: list[ModuleDevice], session: str, members: tuple[str, ...], bits: int = 32) -> np.ndarray:
    ring = Ring(bits)
    total = ring.zeros(SPEC.num_parameters + 1)
    for device in devices:
        if device.client_id in members:
            total = ring.add(total, device.secure.submitted[session])
    return total


async def _prepare(devices: list[ModuleDevice], settings: SecAggSettings, inputs: dict, *, without: frozenset[str] = frozenset()) -> None:
    model = announcement(devices[0].topics.fleet, 1, settings, devices[0].spec)
    for device in devices:
        await device.secure.on_announcement(model)
        if device.client_id not in without:
            await device.secure.submit(model, *inputs[device.client_id])


def _check_mean(outcome: object, inputs: dict, members: tuple[str, ...]) -> SecureMean:
    assert isinstance(outcome, SecureMean), outcome
    assert outcome.survivors == members and outcome.count == len(members)
    assert outcome.weight == pytest.approx(sum(inputs[m][1] for m in members))
    expected = fedavg(inputs, members)
    for name, values in expected.items():
        np.testing.assert_allclose(outcome.delta[name], values, atol=2e-6)  # the fixed point's step is 3.7e-7 per device
    return outcome


async def test_masks_cancel_and_the_mean_is_the_fedavg_of_the_fixed_point_deltas(broker_address, fleet, tmp_path):
    clients = [f"dev-{i}" for i in range(8)]
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c) for c in clients]
    inputs, settings, store = deltas(clients), SecAggSettings(timeouts=TIMEOUTS), Store()
    async with asyncio.timeout(60), running(devices), coordinator(broker_address, fleet, store, settings=settings) as coord:
        await _prepare(devices, settings, inputs)
        setup = await coord.relay.start(1, clients, now=time.monotonic())
        await coord.run()
        outcome = _check_mean(coord.relay.outcome, inputs, tuple(clients))
        assert np.array_equal(outcome.aggregate.total, _ring_sum(devices, setup.session, tuple(clients)))  # exactly, in the ring
        assert coord.refusals == []
        assert [d.secure.stats.revealed for d in devices] == [1] * 8
        assert await retained_under(broker_address, fleet, f"fl/{fleet}/secagg/#") == []  # the session's topics emptied at its end


async def test_a_device_lost_before_its_masked_input_and_one_lost_after_it(broker_address, fleet, tmp_path):
    clients = [f"dev-{i}" for i in range(10)]
    lost = {"dev-0": Shares, "dev-1": MaskedInput}  # lost after sending what is named: dev-0 before its input, dev-1 after it
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c, lose_after=lost.get(c)) for c in clients]
    timeouts = dataclasses.replace(TIMEOUTS, mask=4.0, unmask=4.0)
    inputs, settings, store = deltas(clients, seed=1), SecAggSettings(timeouts=timeouts), Store()
    async with asyncio.timeout(60), running(devices), coordinator(broker_address, fleet, store, settings=settings) as coord:
        await _prepare(devices, settings, inputs)
        setup = await coord.relay.start(1, clients, now=time.monotonic())
        await coord.run()
    survivors = tuple(c for c in clients if c != "dev-0")  # dev-1's input is in the sum: its seed is rebuilt from its neighbours
    outcome = _check_mean(coord.relay.outcome, inputs, survivors)
    assert np.array_equal(outcome.aggregate.total, _ring_sum(devices, setup.session, survivors))
    assert devices[0].lost and devices[1].lost and not any(d.lost for d in devices[2:])
    assert devices[0].topics.device(MaskedInput, "dev-0") not in devices[0].published
    assert devices[1].topics.device(Reveal, "dev-1") not in devices[1].published


async def test_too_many_lost_abandons_the_session_and_the_retry_counts_everyone_once(broker_address, fleet, tmp_path):
    clients = [f"dev-{i}" for i in range(6)]
    late = frozenset(clients[2:])  # still training when the mask phase ends: only 2 inputs, min_survivors is 3
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c) for c in clients]
    timeouts = dataclasses.replace(TIMEOUTS, mask=3.0)
    inputs, settings, store = deltas(clients, seed=2), SecAggSettings(timeouts=timeouts), Store()
    async with asyncio.timeout(60), running(devices), coordinator(broker_address, fleet, store, settings=settings) as coord:
        await _prepare(devices, settings, inputs, without=late)
        first = await coord.relay.start(1, clients, now=time.monotonic())
        await coord.run()
        abandoned = coord.relay.outcome
        assert isinstance(abandoned, Abandoned)
        assert (abandoned.phase, abandoned.reason) == (Phase.MASK, Reason.BELOW_THRESHOLD)
        assert "2 masked inputs, fewer than min_survivors 3" in abandoned.detail
        snapshot = store.last_checkpoint()["server"]
        assert snapshot["phase"] == "abandoned" and snapshot["abandoned"]["reason"] == "below_threshold"
        assert await retained_under(broker_address, fleet, f"fl/{fleet}/secagg/#") == []
        assert len(store.spool[first.session]) == 2  # spooled, never folded into any result

        model = announcement(fleet, 1, settings)
        for device in devices:
            if device.client_id in late:
                await device.secure.submit(model, *inputs[device.client_id])  # training done: the retry can count them
        retry = await coord.relay.start(1, clients, now=time.monotonic())  # the round again, as a new session
        await coord.run()
    assert retry.session != first.session
    outcome = _check_mean(coord.relay.outcome, inputs, tuple(clients))
    assert np.array_equal(outcome.aggregate.total, _ring_sum(devices, retry.session, tuple(clients)))
    assert all(d.secure.stats.joined == 2 and d.secure.stats.revealed == 1 for d in devices)


def _crashed_in(phase: Phase, store: Store):
    """When the coordinator dies: in ``phase`` with some of its answers taken (spooled, for the mask phase)."""
    def predicate(coord) -> bool:
        relay = coord.relay
        if relay.phase is not phase:
            return relay.outcome is not None
        if phase is Phase.MASK:
            return len(store.spool.get(relay.setup.session, [])) >= 2
        return len(relay.waiting_for()) < len(relay.setup.cohort) - 1
    return predicate


@pytest.mark.parametrize("phase", [Phase.SHARE, Phase.MASK, Phase.UNMASK, Phase.DONE])
async def test_a_relay_restarted_mid_protocol_resumes_from_its_checkpoint_and_spool(broker_address, fleet, tmp_path, phase):
    clients = [f"dev-{i}" for i in range(6)]
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c) for c in clients]
    inputs, settings, store = deltas(clients, seed=3), SecAggSettings(timeouts=TIMEOUTS), Store()
    async with asyncio.timeout(60), running(devices):
        await _prepare(devices, settings, inputs)
        async with coordinator(broker_address, fleet, store, settings=settings) as coord:
            setup = await coord.relay.start(1, clients, now=time.monotonic())
            await coord.run(until=lambda: _crashed_in(phase, store)(coord))
            assert coord.relay.phase is phase or (phase is Phase.DONE and coord.relay.outcome is not None)
        # the coordinator died; what was in flight to it is lost; it comes back from the store
        async with coordinator(broker_address, fleet, store, settings=settings, resume=True, name="resumed") as again:
            assert again.relay.phase is phase
            await again.run()
    outcome = _check_mean(again.relay.outcome, inputs, tuple(clients))
    assert outcome.session == setup.session
    assert np.array_equal(outcome.aggregate.total, _ring_sum(devices, setup.session, tuple(clients)))  # each input counted once


async def test_a_relay_that_cannot_resume_starts_the_round_again_and_counts_everyone_once(broker_address, fleet, tmp_path):
    clients = [f"dev-{i}" for i in range(6)]
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c) for c in clients]
    inputs, settings, store = deltas(clients, seed=4), SecAggSettings(timeouts=TIMEOUTS), Store()
    async with asyncio.timeout(60), running(devices):
        await _prepare(devices, settings, inputs)
        async with coordinator(broker_address, fleet, store, settings=settings) as coord:
            first = await coord.relay.start(1, clients, now=time.monotonic())
            await coord.run(until=lambda: _crashed_in(Phase.UNMASK, store)(coord))
        store.spool[first.session].pop()  # a masked input the checkpoint counted is gone from the spool
        with pytest.raises(ResumeError, match="lacks"):
            async with coordinator(broker_address, fleet, store, settings=settings, resume=True, name="resumed"):
                pass
        async with coordinator(broker_address, fleet, store, settings=settings, name="fresh") as fresh:
            retry = await fresh.relay.start(1, clients, now=time.monotonic())
            await fresh.run()
    outcome = _check_mean(fresh.relay.outcome, inputs, tuple(clients))
    assert outcome.session == retry.session != first.session
    assert np.array_equal(outcome.aggregate.total, _ring_sum(devices, retry.session, tuple(clients)))


async def test_large_masked_inputs_travel_in_chunks_that_are_cleared_afterwards(broker_address, fleet, tmp_path):
    spec = ModelSpec.of({"w": np.zeros((64, 40), np.float32), "b": np.zeros(40, np.float32)})  # 2,600 parameters: 10.4 kB masked
    clients = [f"dev-{i}" for i in range(5)]
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c, spec=spec, max_message_bytes=2048) for c in clients]
    inputs, settings, store = deltas(clients, spec, seed=5), SecAggSettings(timeouts=TIMEOUTS), Store()
    async with asyncio.timeout(60), running(devices), coordinator(broker_address, fleet, store, settings=settings, spec=spec) as coord:
        await _prepare(devices, settings, inputs)
        await coord.relay.start(1, clients, now=time.monotonic())
        await coord.run()
        assert await retained_under(broker_address, fleet, f"fl/{fleet}/secagg/#") == []
    outcome = coord.relay.outcome
    assert isinstance(outcome, SecureMean) and outcome.count == 5
    expected = fedavg(inputs, tuple(clients), spec)
    for name, values in expected.items():
        np.testing.assert_allclose(outcome.delta[name], values, atol=2e-6)
    for device in devices:  # 10.4 kB in chunks of 2 kB, retained under up/masked/<id>/<session>/<i> (then cleared by both sides)
        assert len({t for t in device.published if t.startswith(device.topics.masked_chunks(device.client_id, outcome.session))}) == 6
    assert len(store.spool[outcome.session]) == 5



async def test_a_broker_that_lost_its_retained_messages_gets_the_phase_again_from_the_relay(broker, broker_address, fleet, tmp_path):
    clients = [f"dev-{i}" for i in range(6)]
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c, lose_after=Shares if c in ("dev-4", "dev-5") else None) for c in clients]
    away = devices[4:]  # their connections drop right after their shares: offline when the bundles go out
    inputs, settings, store = deltas(clients, seed=6), SecAggSettings(timeouts=dataclasses.replace(TIMEOUTS, mask=20.0)), Store()
    async with asyncio.timeout(60), running(devices), coordinator(broker_address, fleet, store, settings=settings) as coord:
        await _prepare(devices, settings, inputs)
        setup = await coord.relay.start(1, clients, now=time.monotonic())
        await coord.run(until=lambda: coord.relay.phase is Phase.MASK)  # everyone shared; the bundles are out
        assert all(d.lost and d.secure.session is not None and d.secure.session.phase.value == "shared" for d in away)
        await broker.kill()  # and it comes back without its persistence: the retained bundles are gone
        assert broker.data_dir is not None
        for stored in broker.data_dir.glob("*.db"):
            stored.unlink()
        await broker.start()
        for device in away:
            device.lose_after, device.ready = None, asyncio.Event()
        async with running(away):  # back online: they find their bundles only because the relay published them again
            await coord.run()
    outcome = _check_mean(coord.relay.outcome, inputs, tuple(clients))
    assert np.array_equal(outcome.aggregate.total, _ring_sum(devices, setup.session, tuple(clients)))
    assert coord.conn.connections == 2

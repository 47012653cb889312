"""Shared fixtures: a real Mosquitto per test session, a fresh fleet name per test."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from hypothesis import settings

from broker import LocalBroker
from fedge.netem import FaultProxy
from fedge_contract.mqtt import BrokerAddress

_fleet_counter = itertools.count()

# Seeds are fixed: the property tests explore the same examples on every run, so a red CI run is
# reproducible and a green one is not luck. FEDGE_HYPOTHESIS=explore searches new examples locally.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("FEDGE_HYPOTHESIS", "fixed"))


@pytest_asyncio.fixture(loop_scope="function")
async def broker(tmp_path) -> AsyncIterator[LocalBroker]:
    """A Mosquitto on a free loopback port, owned by the test (so a test may kill or restart it)."""
    async with LocalBroker(data_dir=tmp_path / "broker") as running:
        yield running


@pytest.fixture
def broker_address(broker: LocalBroker) -> BrokerAddress:
    return BrokerAddress.parse(broker.url)


@pytest.fixture
def fleet(request) -> str:
    """A fleet name of its own per test: topics never leak between tests."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"t{next(_fleet_counter)}-{request.node.name}")[:48]


@pytest_asyncio.fixture(loop_scope="function")
async def fault_proxy() -> AsyncIterator[FaultProxy]:
    """A FaultProxy owned by the test (fixed seed): ``await fault_proxy.add_link(name, (host, port), profile)``
    gives a loopback port to hand an agent instead of the broker's."""
    async with FaultProxy(seed=1234, lifetime=600) as proxy:
        yield proxy

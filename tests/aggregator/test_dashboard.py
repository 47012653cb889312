"""The dashboard's JSON and page: a real aggregator and agents, read over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from aggregator import Aggregator
from aggregator.observability.dashboard import DashboardServer, fleet_state
from aggregator.store import Store, call
from edge_agent import Agent
from fedge_contract import Presence, RoundState, RoundStatus, Topics
from fedge_contract.aio import cancel_and_wait
from fedge_contract.mqtt import BrokerAddress
from tests.aggregator.test_metrics import _get
from tests.integration.fleet import ManualGate, agent_config, aggregator_config, raw_peer


@pytest.mark.integration
async def test_api_state_of_a_real_round(broker_address: BrokerAddress, fleet: str, tmp_path: Path) -> None:
    topics = Topics(fleet)
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=3, target=2, min_updates=2, dashboard_port=0)
    aggregator = Aggregator(config)
    # each agent trains round 1 only: round 2 stays open while the test looks
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=ManualGate(passes=1)) for i in range(2)]
    async with asyncio.timeout(90):
        async with raw_peer(broker_address, f"{fleet}-observer", topics.status) as peer:
            tasks = [asyncio.create_task(aggregator.run())] + [asyncio.create_task(a.run()) for a in agents]
            try:
                status = await peer.wait_open(topics, version=1)
                assert aggregator.dashboard_server is not None
                port = aggregator.dashboard_server.port
                code, body = await _get(port, "/api/state")
                page_code, page = await _get(port, "/")
                missing, _ = await _get(port, "/nope")
                receipts = await call(aggregator.db, Store.receipts)
            finally:
                await cancel_and_wait(tasks)
    assert code == 200 and page_code == 200 and missing == 404
    state = json.loads(body)
    assert state["fleet"] == fleet
    assert (state["round"], state["model_version"], state["state"]) == (2, 1, "open")
    assert (state["accepted"], state["target"]) == (0, 2)
    assert state["deadline"] == pytest.approx(status.deadline)
    assert [(d["client_id"], d["state"]) for d in state["devices"]] == [("agent-0", "online"), ("agent-1", "online")]
    assert all(isinstance(d["device"], dict) for d in state["devices"])
    [row] = state["rounds"]  # round 2 is still open: only round 1 has a row
    assert row["round"] == 1 and row["accepted"] == 2
    assert 0 < row["accuracy"] <= 1 and row["loss"] > 0
    assert row["bytes_up"] == sum(r["bytes"] for r in receipts if r["round"] == 1) > 0
    # bytes down next to bytes up, per device: round 1's announcement is version 0, a hold (no tensors)
    assert row["bytes_up_per_device"] == row["bytes_up"] // len([r for r in receipts if r["round"] == 1])
    assert 200 < row["bytes_down"] < 500
    assert state["bytes_down"] == status.bytes_down and 0 < state["bytes_down"] < 2_000  # round 2's: a delta
    # the page is self-contained: inline script and style, nothing fetched from elsewhere
    assert b'id="round"' in page and b"/api/state" in page
    assert b"<script src" not in page and b"<link" not in page and b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b"")


def test_fleet_state_has_no_nan_and_skips_open_rounds() -> None:
    status = RoundStatus(fleet="f", round=3, model_version=2, state=RoundState.AGGREGATING, accepted=4, target=4,
                         min_updates=1, deadline=None, rounds_total=5, last_metrics={"accuracy": 0.5, "fed_accuracy": 0.75, "fed_version": 1.0},
                         bytes_down=922)
    devices = {"b": Presence(fleet="f", client_id="b", state="offline"),
               "a": Presence(fleet="f", client_id="a", state="online", eligible=False, why_not="battery 12% < 20%", device={"battery": 12.0},
                             dropped=3)}
    rounds = [
        {"round": 1, "closed": 10.0, "accepted": 4, "metrics": {"accuracy": float("nan"), "loss": 0.5}, "bytes_down": 318},
        {"round": 2, "closed": 20.0, "accepted": 3, "metrics": {"fed_accuracy": 0.75, "invited": 5.0}},  # no bytes_down: an old store
        {"round": 3, "closed": None, "accepted": 4, "metrics": {}},
    ]
    state = fleet_state("f", status, devices, rounds, {1: 100, 3: 7}, now=25.0, received={1: 4, 3: 1})
    json.dumps(state, allow_nan=False)  # raises on NaN
    assert (state["round"], state["state"], state["rounds_total"], state["deadline"], state["bytes_down"]) == (3, "aggregating", 5, None, 922)
    assert [d["client_id"] for d in state["devices"]] == ["a", "b"]
    assert state["devices"][0] == {"client_id": "a", "state": "online", "eligible": False, "why_not": "battery 12% < 20%",
                                   "dropped": 3, "device": {"battery": 12.0}}
    assert state["rounds"] == [
        {"round": 1, "accuracy": None, "loss": 0.5, "fed_accuracy": None, "invited": None, "accepted": 4, "bytes_up": 100,
         "bytes_up_per_device": 25, "bytes_down": 318},
        {"round": 2, "accuracy": None, "loss": None, "fed_accuracy": 0.75, "invited": 5.0, "accepted": 3, "bytes_up": 0,
         "bytes_up_per_device": None, "bytes_down": 0},
    ]
    assert state["federated"] == {"accuracy": 0.75, "version": 1.0}
    assert fleet_state("f", None, {}, [], {}, now=0.0)["state"] == "starting"


async def test_dashboard_server_routes_and_stops_with_its_block() -> None:
    async def state() -> dict[str, int]:
        return {"round": 7}

    async with asyncio.timeout(10):
        async with DashboardServer(state) as server:
            assert await _get(server.port, "/api/state") == (200, b'{"round":7}')
            assert (await _get(server.port, "/api/state", method="POST"))[0] == 405
            assert (await _get(server.port, "/index.html"))[0] == 200
            port = server.port
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

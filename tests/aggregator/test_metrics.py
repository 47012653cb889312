"""Prometheus metrics: a real aggregator and agents, scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator import Aggregator
from aggregator.observability.metrics import AggregatorMetrics, MetricsServer
from edge_agent import Agent
from fedge_contract import Topics
from fedge_contract.aio import cancel_and_wait
from fedge_contract.mqtt import BrokerAddress
from fedge_runtime.logs import JsonFormatter
from tests.integration.fleet import ManualGate, agent_config, aggregator_config, raw_peer


async def _get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


@pytest.mark.integration
async def test_metrics_of_a_real_round(broker_address: BrokerAddress, fleet: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedge.aggregator")
    topics = Topics(fleet)
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=3, target=2, min_updates=2, metrics_port=0)
    aggregator = Aggregator(config)
    # each agent trains round 1 only: round 2 stays open while the test looks
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=ManualGate(passes=1)) for i in range(2)]
    async with asyncio.timeout(90):
        async with raw_peer(broker_address, f"{fleet}-observer", topics.status, topics.receipt("mallory")) as peer:
            tasks = [asyncio.create_task(aggregator.run())] + [asyncio.create_task(a.run()) for a in agents]
            try:
                await peer.wait_open(topics, version=1)
                await peer.client.publish(topics.update("mallory"), b"not an update", qos=1)
                await peer.next_payload(topics.receipt("mallory"))
                assert aggregator.metrics_server is not None
                code, body = await _get(aggregator.metrics_server.port)
            finally:
                await cancel_and_wait(tasks)
    assert code == 200
    samples = _samples(body)
    assert samples[("fedge_updates_total", (("reason", ""), ("status", "accepted")))] == 2
    assert samples[("fedge_updates_total", (("reason", "malformed"), ("status", "rejected")))] == 1
    assert samples[("fedge_model_version", ())] == 1
    assert samples[("fedge_round", ())] == 2
    assert samples[("fedge_round_accepted_updates", ())] == 0
    assert samples[("fedge_round_target_updates", ())] == 2
    assert samples[("fedge_rounds_closed_total", ())] == 1
    assert samples[("fedge_online_agents", ())] == 2
    assert samples[("fedge_agent_dropped_updates", ())] == 0  # the devices' own count, from their presence (issue 19)
    assert samples[("fedge_event_loop_longest_stall_seconds", ())] >= 0
    assert samples[("fedge_round_duration_seconds_count", ())] == 1
    assert samples[("fedge_update_bytes_received_total", (("status", "rejected"),))] == len(b"not an update")
    assert samples[("fedge_update_bytes_received_total", (("status", "accepted"),))] > 0
    assert samples[("fedge_bytes_published_total", ())] > 0
    assert 0 < samples[("fedge_eval_accuracy", ())] <= 1
    # the receipt's log line carries its fields (fedge --log-json writes them as JSON keys)
    rejected = [r for r in caplog.records if getattr(r, "client", None) == "mallory"]
    assert len(rejected) == 1
    entry = json.loads(JsonFormatter().format(rejected[0]))
    assert entry["status"] == "rejected" and entry["reason"].startswith("malformed") and entry["round"] == 2
    assert entry["update"] is None  # no update id could be read from the garbage


async def test_server_answers_only_metrics_and_stops_with_its_block() -> None:
    metrics = AggregatorMetrics()
    metrics.receipt("rejected", "non_finite: tensor fc.weight", 10)
    async with asyncio.timeout(10):
        async with MetricsServer(metrics.exposition) as server:
            code, body = await _get(server.port)
            assert code == 200
            assert _samples(body)[("fedge_updates_total", (("reason", "non_finite"), ("status", "rejected")))] == 1
            assert (await _get(server.port, "/other"))[0] == 404
            assert (await _get(server.port, method="POST"))[0] == 405
            head_code, head_body = await _get(server.port, method="HEAD")
            assert head_code == 200 and head_body == b""
            port = server.port
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


def test_registries_are_per_instance() -> None:
    first, second = AggregatorMetrics(), AggregatorMetrics()
    first.receipt("accepted", "", 5)
    assert b'fedge_updates_total{reason="",status="accepted"} 1.0' in first.exposition()
    assert b"fedge_updates_total{" not in second.exposition()


def test_the_fleet_view_sums_what_devices_dropped() -> None:
    from aggregator.observability.fleet import FleetView
    from fedge_contract import Presence

    metrics = AggregatorMetrics()
    fleet = FleetView("f", metrics)
    fleet.on_presence("a", Presence(fleet="f", client_id="a", state="online", dropped=2).to_bytes())
    fleet.on_presence("b", Presence(fleet="f", client_id="b", state="offline", dropped=1).to_bytes())
    fleet.on_presence("a", Presence(fleet="f", client_id="a", state="online", dropped=3).to_bytes())  # a's count grew
    assert _samples(metrics.exposition())[("fedge_agent_dropped_updates", ())] == 4
    assert _samples(metrics.exposition())[("fedge_online_agents", ())] == 1


def test_a_stale_will_does_not_lower_what_a_device_dropped() -> None:
    """A last will is fixed when its connection opens: one published after a device dropped more updates carries an
    older count. The count is a lifetime total, so the fleet view keeps the highest it has seen per device."""
    from aggregator.observability.fleet import FleetView
    from fedge_contract import Presence

    metrics = AggregatorMetrics()
    fleet = FleetView("f", metrics)
    fleet.on_presence("a", Presence(fleet="f", client_id="a", state="online", dropped=3).to_bytes())
    fleet.on_presence("a", Presence(fleet="f", client_id="a", state="offline", dropped=1).to_bytes())  # the older will
    assert fleet.devices["a"].dropped == 3 and fleet.devices["a"].state == "offline"
    assert _samples(metrics.exposition())[("fedge_agent_dropped_updates", ())] == 3

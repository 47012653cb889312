"""``fedge status``: the retained fleet state, read from a real broker and rendered."""

from __future__ import annotations

import asyncio
import io
import sys
import time

from rich.console import Console

from fedge.status import FleetView, render
from fedge_contract import Presence, RoundState, RoundStatus, Topics
from fedge_contract.mqtt import BrokerAddress
from tests.integration.fleet import raw_peer


def _status(fleet: str, **overrides: object) -> RoundStatus:
    fields: dict = {"fleet": fleet, "round": 4, "model_version": 3, "state": RoundState.OPEN, "accepted": 2, "target": 5, "min_updates": 3,
                    "deadline": time.time() + 600, "rounds_total": 30, "last_metrics": {"accuracy": 0.8125, "loss": 0.61}}
    fields.update(overrides)
    return RoundStatus(**fields)  # type: ignore[arg-type]


def _text(view: FleetView) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render(view))
    return console.export_text()


async def test_status_once_shows_round_and_devices_from_retained_topics(broker_address: BrokerAddress, fleet: str) -> None:
    topics = Topics(fleet)
    devices = [
        Presence(fleet, "phone-1", "online", "0.1.0", eligible=True, device={"battery": 87.0, "charging": True}),
        Presence(fleet, "phone-2", "online", "0.1.0", eligible=False, why_not="battery 12% < 30%", device={"battery": 12.0}),
        Presence(fleet, "pi-3", "offline", dropped=2),
    ]
    async with asyncio.timeout(60):
        async with raw_peer(broker_address, f"{fleet}-publisher") as peer:
            await peer.client.publish(topics.status, _status(fleet).to_bytes(), qos=1, retain=True)
            for presence in devices:
                await peer.client.publish(topics.presence(presence.client_id), presence.to_bytes(), qos=1, retain=True)
            await peer.client.publish(topics.presence("broken"), b"{not json", qos=1, retain=True)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedge", "status", "--broker", str(broker_address), "--fleet", fleet, "--once",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
    text = out.decode()
    assert process.returncode == 0, err.decode()
    assert "round 4/30" in text and "model v3" in text and "state open" in text
    assert "accepted 2/5 (min 3)" in text
    assert "accuracy 0.8125" in text
    assert "devices 3: 2 online, 1 eligible, 2 updates dropped unanswered" in text  # issue 19: counted, never silent
    for client in ("phone-1", "phone-2", "pi-3"):
        assert client in text
    assert "battery 12% < 30%" in text
    assert "charging=True" in text
    assert f"unreadable {topics.presence('broken')}" in text  # a bad payload is shown, not fatal
    [pi_row] = [line for line in text.splitlines() if "pi-3" in line]
    assert pi_row.split()[-1] == "2"  # its own count, in the dropped column


async def test_status_once_on_an_empty_fleet_says_so(broker_address: BrokerAddress, fleet: str) -> None:
    from fedge.status import snapshot

    async with asyncio.timeout(30):
        view = await snapshot(broker_address, fleet)
    assert view.status is None and not view.devices
    assert "no status from an aggregator yet" in _text(view)


def test_view_follows_updates_and_cleared_presence() -> None:
    fleet = "f"
    topics = Topics(fleet)
    view = FleetView(fleet)
    view.apply(topics.presence("a"), Presence(fleet, "a", "online", eligible=True).to_bytes())
    view.apply(topics.presence("a"), Presence(fleet, "a", "offline").to_bytes())
    assert view.devices["a"].state == "offline"
    view.apply(topics.presence("a"), b"")  # retained message cleared
    assert not view.devices
    view.apply(topics.status, _status(fleet, state=RoundState.FINISHED, deadline=None).to_bytes())
    view.apply(topics.presence("other-fleet-junk"), b"x")
    assert "unreadable" in _text(view)
    view.apply(topics.presence("other-fleet-junk"), b"")
    text = _text(view)
    assert "state finished" in text and "deadline none" in text and "unreadable" not in text


def test_deadline_countdown() -> None:
    view = FleetView("f", status=_status("f", deadline=1000.0))
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render(view, now=990.0))
    console.print(render(view, now=1003.0))
    text = console.export_text()
    assert "deadline in 10s" in text and "deadline passed 3s ago" in text

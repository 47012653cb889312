"""The dashboard end to end: headless Chromium (Debian's chromium, installed by scripts/bootstrap.sh)
loads the page of a running aggregator, shows its devices and follows the round counter.

Chromium is driven over the DevTools protocol with ``websockets``: no browser-automation
framework, no download. Waits are on the page itself: each ``Runtime.evaluate`` returns a promise
that resolves when a condition on the DOM holds (checked at once, then at every DOM mutation the
page's own 1 s polling causes), all under one ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from aggregator import Aggregator
from edge_agent import Agent
from fedge_contract import Topics
from fedge_contract.aio import cancel_and_wait
from fedge_contract.mqtt import BrokerAddress
from tests.integration.fleet import ManualGate, agent_config, aggregator_config, raw_peer

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path("/tmp/fedge-dashboard.png")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium): run scripts/bootstrap.sh as root")


class DevTools:
    """Sequential DevTools calls over one websocket, in the page's flat session (events are ignored)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.session: str | None = None

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == number:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def until(self, condition: str) -> Any:
        """The value of the JS expression ``condition`` once it is truthy (it is re-checked on every DOM change)."""
        script = f"""new Promise(resolve => {{
            const check = () => {{ const value = ({condition}); if (value) {{ observer.disconnect(); resolve(value); }} }};
            const observer = new MutationObserver(check);
            observer.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});
            check();
        }})"""
        result = await self.call("Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"]["value"]


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium on about:blank, attached to its page; killed (its whole process group) on exit."""
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    drain: asyncio.Task[None] | None = None
    try:
        assert process.stderr is not None
        seen: list[str] = []
        while True:
            line = (await process.stderr.readline()).decode(errors="replace")
            if not line:
                raise RuntimeError("chromium exited before its DevTools endpoint was up:\n" + "".join(seen[-20:]))
            seen.append(line)
            if line.startswith("DevTools listening on "):
                endpoint = line.removeprefix("DevTools listening on ").strip()
                break

        async def discard(stream: asyncio.StreamReader) -> None:  # a full stderr pipe would stall Chromium
            while await stream.read(65536):
                pass

        drain = asyncio.create_task(discard(process.stderr))
        async with websockets.connect(endpoint, max_size=None) as ws:
            tools = DevTools(ws)
            [page] = [t for t in (await tools.call("Target.getTargets"))["targetInfos"] if t["type"] == "page"]
            tools.session = (await tools.call("Target.attachToTarget", targetId=page["targetId"], flatten=True))["sessionId"]
            yield tools
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)  # the browser and its zygote/renderers: a session of their own
        await process.wait()
        if drain is not None:
            await cancel_and_wait([drain])


@pytest.mark.integration
async def test_dashboard_in_headless_chromium(broker_address: BrokerAddress, fleet: str, tmp_path: Path) -> None:
    topics = Topics(fleet)
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=0, target=3, min_updates=3, dashboard_port=0)
    # rounds=0: forever, so the dashboard outlives the rounds the page watches (the test cancels the run)
    aggregator = Aggregator(config)
    gates = [ManualGate(passes=1) for _ in range(3)]  # round 1 only, until the test opens the gates
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=gate) for i, gate in enumerate(gates)]
    async with asyncio.timeout(100):
        async with raw_peer(broker_address, f"{fleet}-observer", topics.status) as peer:
            tasks = [asyncio.create_task(aggregator.run())] + [asyncio.create_task(a.run()) for a in agents]
            try:
                # round 2 is open and the agents are held: the page has a stable state to show
                await peer.wait_open(topics, version=1)
                assert aggregator.dashboard_server is not None
                url = aggregator.dashboard_server.url + "/"
                async with chromium(tmp_path / "chromium-profile") as page:
                    await page.call("Page.navigate", url=url)
                    devices = await page.until(
                        "document.querySelectorAll('#devices tr').length === 3 && "
                        "[...document.querySelectorAll('#devices tr')].map(r => r.dataset.client + ' ' + r.cells[1].textContent)"
                    )
                    assert devices == ["agent-0 online", "agent-1 online", "agent-2 online"]
                    first = int(await page.until("document.getElementById('round').textContent.match(/^\\d+$/) && "
                                                 "document.getElementById('round').textContent"))
                    assert first == 2
                    assert await page.until("document.getElementById('fleet').textContent") == fleet
                    for gate in gates:
                        gate.open()
                    later = await page.until(f"document.getElementById('round').textContent !== '{first}' && "
                                             "document.getElementById('round').textContent")
                    assert int(later) > first
                    charted = await page.until("document.querySelectorAll('#accuracy-chart circle').length >= 3 && "
                                               "[document.querySelectorAll('#accuracy-chart circle').length, "
                                               "document.querySelectorAll('#bytes-chart rect').length, "
                                               "+document.getElementById('round').textContent]")
                    circles, bars, shown = charted
                    # a point and two bars (up, down) per closed round (the shown one may be closing)
                    assert 2 * circles == bars and shown - 1 <= circles <= shown
                    down = await page.until("document.getElementById('down').textContent !== '-' && document.getElementById('down').textContent")
                    value, unit = down.split()
                    assert float(value) > 0 and (unit == "B" or (unit == "KiB" and float(value) < 2))  # a delta, not the 38 KiB model
                    shot = await page.call("Page.captureScreenshot", format="png")
                    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))  # noqa: ASYNC240 - a test's one screenshot
            finally:
                await cancel_and_wait(tasks)

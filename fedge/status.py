"""``fedge status``: the fleet as the broker's retained topics describe it.

The aggregator keeps ``fl/<fleet>/status`` retained and every agent keeps its
``presence/<id>`` retained (its last will says offline), so a fresh subscriber learns the
whole picture at once, without asking the aggregator anything. This module folds those
messages into a ``FleetView`` and renders it with rich: live (``watch``) or one snapshot
(``snapshot``, for scripts).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import aiomqtt
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedge_contract import Presence, RoundStatus, Topics
from fedge_contract.errors import DecodeError
from fedge_contract.mqtt import BrokerAddress, Connection, make_client


@dataclass
class FleetView:
    """What the retained messages of one fleet say; ``apply`` folds one message in."""

    fleet: str
    status: RoundStatus | None = None
    devices: dict[str, Presence] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # topic -> why its payload was not understood

    def apply(self, topic: str, payload: bytes) -> None:
        topics = Topics(self.fleet)
        try:
            if topic == topics.status:
                self.status = RoundStatus.from_bytes(payload, fleet=self.fleet) if payload else None
            else:
                client = topics.client_of(topic)
                if client is None or topic != topics.presence(client):
                    return
                if not payload:  # an empty retained message clears a device
                    self.devices.pop(client, None)
                else:
                    self.devices[client] = Presence.from_bytes(payload, fleet=self.fleet)
            self.problems.pop(topic, None)
        except DecodeError as exc:
            self.problems[topic] = str(exc)


def _deadline(status: RoundStatus, now: float) -> str:
    if status.deadline is None:
        return "none"
    left = status.deadline - now
    return f"in {left:.0f}s" if left >= 0 else f"passed {-left:.0f}s ago"


def _summary(view: FleetView, now: float) -> Text:
    status = view.status
    online = sum(1 for p in view.devices.values() if p.state == "online")
    eligible = sum(1 for p in view.devices.values() if p.state == "online" and p.eligible)
    text = Text()
    text.append(f"fleet {view.fleet}", style="bold")
    if status is None:
        text.append("  no status from an aggregator yet")
    else:
        total = f"/{status.rounds_total}" if status.rounds_total else ""
        text.append(f"  round {status.round}{total}  model v{status.model_version}  state {status.state.value}\n")
        text.append(f"accepted {status.accepted}/{status.target} (min {status.min_updates})  deadline {_deadline(status, now)}")
        if status.bytes_up is not None or status.bytes_down is not None:  # aggregators since issue 16
            up = f"up {status.bytes_up:,} B" if status.bytes_up is not None else "up ?"
            down = f"down {status.bytes_down:,} B per device" if status.bytes_down is not None else "down ?"
            text.append(f"\ntraffic this round: {up} (all updates), {down} (the model's announcement)")
        metrics = status.last_metrics
        if "accuracy" in metrics or "loss" in metrics:
            parts = [f"{name} {metrics[name]:.4f}" for name in ("accuracy", "loss") if name in metrics]
            text.append("  last " + ", ".join(parts))
        if status.note:  # what the round says about itself (a secure round's phase, an abandoned session)
            text.append(f"\n{status.note}")
    text.append(f"\ndevices {len(view.devices)}: {online} online, {eligible} eligible")
    dropped = sum(p.dropped for p in view.devices.values())
    if dropped:  # updates devices trained but threw away unanswered (their round was over): issue 19
        text.append(f", {dropped} update{'s' if dropped != 1 else ''} dropped unanswered", style="yellow")
    return text


def _device_table(view: FleetView) -> Table:
    table = Table(show_edge=False)
    for column in ("device", "state", "eligible", "why not", "readings", "version"):
        table.add_column(column)
    table.add_column("dropped", justify="right")  # updates dropped unanswered, ever
    for client in sorted(view.devices):
        p = view.devices[client]
        eligible = {True: "yes", False: "no", None: "?"}[p.eligible]
        readings = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(p.device.items()))
        style = "" if p.state == "online" else "dim"
        table.add_row(client, p.state, eligible, p.why_not, readings, p.agent_version, str(p.dropped), style=style)
    return table


def render(view: FleetView, now: float | None = None) -> Group:
    parts: list[Text | Table] = [_summary(view, time.time() if now is None else now)]
    if view.devices:
        parts.append(_device_table(view))
    for topic, problem in sorted(view.problems.items()):
        parts.append(Text(f"unreadable {topic}: {problem}", style="yellow"))
    return Group(*parts)


def _payload(message: aiomqtt.Message) -> bytes:
    return message.payload if isinstance(message.payload, bytes) else bytes(str(message.payload or ""), "utf-8")


async def snapshot(address: BrokerAddress, fleet: str, *, settle: float = 5.0) -> FleetView:
    """The fleet once every retained message has arrived.

    The broker sends a subscription's retained messages before anything published after the
    SUBACK, so after subscribing we publish a marker to a topic of our own and stop when it comes
    back. A broker whose ACL refuses the marker never echoes it: then ``settle`` seconds bound the wait.
    """
    topics = Topics(fleet)
    view = FleetView(fleet)
    identifier = f"fedge-status-{uuid.uuid4().hex[:12]}"
    marker = f"{topics.prefix}/status-probe/{identifier}"
    async with make_client(address, identifier, persistent=False) as client:
        for topic in (topics.status, topics.all_presence, marker):
            await client.subscribe(topic, qos=1)
        await client.publish(marker, b"sync", qos=1)
        try:
            async with asyncio.timeout(settle):
                async for message in client.messages:
                    topic = str(message.topic)
                    if topic == marker:
                        break
                    view.apply(topic, _payload(message))
        except TimeoutError:
            pass
    return view


async def watch(address: BrokerAddress, fleet: str, console: Console, *, refresh: float = 1.0) -> None:
    """Redraw the fleet as messages arrive (and every ``refresh`` s for the deadline countdown) until cancelled."""
    topics = Topics(fleet)
    view = FleetView(fleet)
    identifier = f"fedge-status-{uuid.uuid4().hex[:12]}"
    async with Connection(address, identifier, subscriptions=[topics.status, topics.all_presence], persistent=False) as conn:
        with Live(render(view), console=console, auto_refresh=False) as live:
            while True:
                try:
                    async with asyncio.timeout(refresh):
                        message = await conn.messages.get()
                    view.apply(str(message.topic), _payload(message))
                except TimeoutError:
                    pass
                live.update(render(view), refresh=True)


async def run_status(address: BrokerAddress, fleet: str, *, once: bool, console: Console | None = None) -> int:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped into a script: do not wrap the device table at 80 columns
            console = Console(width=max(console.width, 200))
    if once:
        console.print(render(await snapshot(address, fleet)))
        return 0
    await watch(address, fleet, console)
    return 0

"""A passive subscriber to ``fl/<fleet>/#`` that measures what really crossed the broker.

The simulation's byte counts come from here, from the payloads the broker delivered, not from
what programs believe they sent: bytes up are the update payloads published in each round,
bytes down are each announcement on ``global`` times the agents subscribed to it: a GlobalModel,
or under delta broadcasts a GlobalDelta, whole or as its manifest plus chunks (a chunked
announcement of version v counts for round v + 1, the round it opens in sync and async mode alike).

Delta broadcasts also put catch-up material on retained topics (``global/key``, ``global/delta/<u>``,
``global/task`` and their chunks), just before the announcement it goes with. Only a device that
missed versions downloads it, by subscribing later, so the wire shows its publication, not its
downloads: it is counted once, for the round of the announcement that follows it, as
``retained_bytes`` (what the aggregator stored on the broker). What devices really fetched to catch
up, each agent counts itself (``AgentStats.bytes_down``, ``AgentStats.held``).
In secure rounds (``--secure-aggregation``) no Update is published: bytes up are what devices
publish on ``secagg/up/`` and bytes down add what the aggregator publishes on ``secagg/down/`` (a
broadcast times the agents subscribed, a device's own key list or bundle once), each counted in the
round whose status was open last.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import msgpack

from fedge_contract import DecodeError, RoundState, RoundStatus, Topics, Update
from fedge_contract.broadcast import decode_announcement
from fedge_contract.chunks import Manifest, is_manifest
from fedge_contract.mqtt import BrokerAddress, Subscriber

_MAX = 2**31


@dataclass
class RoundTraffic:
    updates: int = 0
    bytes_up: int = 0
    global_payloads: list[int] = field(default_factory=list)  # each announcement's bytes (manifest and chunks included)
    retained_bytes: int = 0  # catch-up material published this round (keyframes, retained deltas, the task), stored once
    opened_at: float | None = None
    closed_at: float | None = None
    selection_bytes: int = 0  # the largest cohort field announced for the round (an extension re-announces a larger one)
    train_seconds: float = 0.0  # devices' training time, as their updates report it (resends counted once per update id)
    update_ids: set[str] = field(default_factory=set)
    secure_bytes_down: int = 0  # secure aggregation's messages to the devices (secagg/down/)


class WireTap(Subscriber):
    """``updates=False`` watches only the global model and the status (synthetic load: the tap would
    otherwise take a copy of every update, doubling the broker's egress)."""

    def __init__(self, address: BrokerAddress, fleet: str, subscribers: int, *, updates: bool = True) -> None:
        self.topics = Topics(fleet)
        self.subscribers = subscribers  # agents receiving each global model
        self.rounds: dict[int, RoundTraffic] = collections.defaultdict(RoundTraffic)
        self.final_global_bytes = 0
        self.unattributed_bytes = 0
        self._chunks: dict[int, int] = collections.defaultdict(int)  # version -> bytes of its announcement's chunks so far
        self._retained = 0  # catch-up material since the last announcement: the broadcaster publishes it first
        self.finished = asyncio.Event()
        self.progress = asyncio.Queue[RoundStatus]()
        self._open_round = 0  # the round whose status said open last (secure aggregation's traffic is counted there)
        self._secagg = f"{self.topics.prefix}/secagg/"
        self._broadcasts = {f"{self._secagg}down/setup", f"{self._secagg}down/unmask"}
        # ``global/#`` matches ``global`` too (MQTT's multi-level wildcard includes the parent level)
        topics = [f"{self.topics.prefix}/#"] if updates else [f"{self.topics.global_model}/#", self.topics.status]
        super().__init__(address, f"fedge-wiretap-{fleet}", topics)

    def bytes_down(self, round_no: int) -> int:
        traffic = self.rounds[round_no]
        return sum(traffic.global_payloads) * self.subscribers + traffic.secure_bytes_down

    async def on_message(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        if topic == self.topics.global_model:
            self._on_global(payload)
        elif topic.startswith(f"{self.topics.global_model}/"):
            self._on_broadcast_part(topic, payload)
        elif topic == self.topics.status:
            self._on_status(payload, now)
        elif topic.startswith(f"{self.topics.prefix}/updates/"):
            self._on_update(payload)
        elif topic.startswith(self._secagg):
            self._on_secure(topic, payload)

    def _on_secure(self, topic: str, payload: bytes) -> None:
        traffic = self.rounds[self._open_round]
        if topic.startswith(f"{self._secagg}up/"):
            traffic.bytes_up += len(payload)
        else:
            traffic.secure_bytes_down += len(payload) * (self.subscribers if topic in self._broadcasts else 1)

    def _on_global(self, payload: bytes) -> None:
        if not payload:
            return  # a retained announcement being cleared
        try:
            if is_manifest(payload):  # a chunked announcement: its chunks came first
                version = Manifest.from_bytes(payload, max_size=_MAX).model_version
                assert version is not None
                self._announced(version + 1, len(payload) + self._chunks.pop(version, 0))
                return
            model = decode_announcement(payload, max_bytes=_MAX)
        except DecodeError:
            self.unattributed_bytes += len(payload)
            return
        if model.final:
            self.final_global_bytes += len(payload) * self.subscribers
        else:
            self._announced(model.round, len(payload))
            if model.cohort is not None:
                traffic = self.rounds[model.round]
                traffic.selection_bytes = max(traffic.selection_bytes, len(msgpack.packb({"cohort": model.cohort.to_wire()})))

    def _announced(self, round_no: int, nbytes: int) -> None:
        traffic = self.rounds[round_no]
        traffic.global_payloads.append(nbytes)
        traffic.retained_bytes += self._retained  # what the broadcaster published just before this announcement
        self._retained = 0

    def _on_broadcast_part(self, topic: str, payload: bytes) -> None:
        """A chunk of an announcement (``global/<v>/<i>``) or catch-up material (anything else under ``global/``)."""
        if not payload:
            return  # a retired delta or an obsolete chunk being emptied
        chunk = self.topics.chunk_of(topic)
        level = topic[len(self.topics.global_model) + 1 :].split("/", 1)[0]
        if chunk is not None and level.isdigit():
            self._chunks[int(level)] += len(payload)
        else:
            self._retained += len(payload)

    def _on_update(self, payload: bytes) -> None:
        try:
            update = Update.from_bytes(payload, max_bytes=_MAX)
        except DecodeError:
            self.unattributed_bytes += len(payload)
            return
        traffic = self.rounds[update.round]
        traffic.updates += 1
        traffic.bytes_up += len(payload)
        if update.update_id not in traffic.update_ids:
            traffic.update_ids.add(update.update_id)
            traffic.train_seconds += float(update.metrics.get("train_seconds", 0.0))

    def _on_status(self, payload: bytes, now: float) -> None:
        status = RoundStatus.from_bytes(payload)
        traffic = self.rounds[status.round]
        if status.state is RoundState.OPEN:
            self._open_round = status.round
        if status.state is RoundState.OPEN and traffic.opened_at is None:
            traffic.opened_at = now
        elif status.state is RoundState.AGGREGATING:
            self.progress.put_nowait(status)
        elif status.state is RoundState.FINISHED:
            self.finished.set()
        if status.state is not RoundState.FINISHED:
            previous = self.rounds.get(status.round - 1)
            if previous is not None and previous.closed_at is None and status.state is RoundState.OPEN:
                previous.closed_at = now
        else:
            last = self.rounds.get(status.round)
            if last is not None and last.closed_at is None:
                last.closed_at = now

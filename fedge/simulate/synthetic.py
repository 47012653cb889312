"""Synthetic agents: load for ``fedge simulate --synthetic``, where the transport and the aggregator
are what is measured, not training.

A synthetic agent is what a device looks like on the wire and nothing more: its own MQTT
connection and persistent session (``fedge-agent-<id>``, retained presence with a last will), one
Update per round of the global model's shape encoded with the round's codec (``TaskConfig.codec``),
held until its receipt and resent on reconnect or when the round is re-announced, dropped when a
newer round opens. It never imports torch and keeps no model: a host process runs a thousand.

Why not ``edge_agent.Agent`` with a fake trainer: an Agent keeps the global model twice (the
decoded message and its payload, to hand to training), an outbox on disk and error-feedback
residuals, which is 8-12 MB per agent for a 1M-parameter model (12 GB for 1000), and its in-thread
training loads the task with torch. What is shared with it is what the wire sees: Connection,
the message classes and the codecs.

Deltas come from a DeltaPool: ``size`` seeded N(0, 0.01^2) deltas per (model, codec), encoded
once per host. Drawing and encoding 1M values costs tens of ms, so fresh noise per agent per
round would make the agent hosts, not the aggregator, the bottleneck; the aggregator decodes every
update in full either way, and noise compresses as badly whether or not it repeats. Error feedback
(top-k's residuals) is not kept: bytes and decode work are what the load test is about.

Downloads (``downloads``): ``all`` subscribes every agent to the retained global model, as real
devices do: a round costs ``agents x model bytes`` of broker egress (1000 agents x 4 MB = 4 GB per
round for a 1M-parameter f32 model) and as much transient memory in the hosts. ``host`` (the
default) has one subscriber per host process that fans the round out to its agents in memory:
``hosts x model bytes`` per round; the upload side, which is what the aggregator sees, is the same.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from fedge_contract import DecodeError, GlobalModel, Presence, Receipt, ReceiptStatus, Topics, Update, new_update_id
from fedge_contract.aio import race
from fedge_contract.codecs import EncodedTensor, encode_weights, parse_chain
from fedge_contract.cohort import Participation
from fedge_contract.errors import CodecError
from fedge_contract.evaluation import EvalReport
from fedge_contract.mqtt import QOS, Backoff, BrokerAddress, Connection, Subscriber

log = logging.getLogger("fedge.synthetic")

AGENT_VERSION = "synthetic"
DOWNLOADS = ("host", "all")
MAX_MODEL_BYTES = 2**31
DELTA_STD = 0.01  # like bench/codecs.py's random deltas: the scale of a real update


@dataclass(frozen=True)
class RoundInfo:
    """What an agent needs from a GlobalModel: the round, the version, the codec and the shapes."""

    round: int
    version: int
    final: bool
    codec: str
    fingerprint: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    fleet: str = ""
    cohort: Participation | None = None  # who trains, who evaluates (fedge_contract/cohort.py)

    @classmethod
    def of(cls, model: GlobalModel) -> RoundInfo:
        return cls(model.round, model.model_version, model.final, model.task.codec, model.fingerprint,
                   tuple((t.name, t.shape) for t in model.tensors), model.fleet, model.cohort)

    def invites(self, client_id: str) -> bool:
        return self.cohort is None or self.cohort.invites(client_id, fleet=self.fleet, round_no=self.round)

    def asks_eval(self, client_id: str) -> bool:
        return self.cohort is not None and self.cohort.asks_eval(client_id, fleet=self.fleet, model_version=self.version)


class DeltaPool:
    """``size`` pre-encoded noise deltas per (model, codec), shared by every agent of a host."""

    def __init__(self, size: int = 8, seed: int = 0) -> None:
        if size < 1:
            raise ValueError("the delta pool needs at least one delta")
        self.size = size
        self.seed = seed
        self._sets: dict[tuple[str, str], list[tuple[EncodedTensor, ...]]] = {}
        self._lock = asyncio.Lock()

    async def prepare(self, info: RoundInfo) -> None:
        """Encode this round's deltas if not done yet (in a thread: the connections stay served)."""
        async with self._lock:
            key = (info.fingerprint, info.codec)
            if key not in self._sets:
                self._sets[key] = await asyncio.to_thread(self._build, info)

    def _build(self, info: RoundInfo) -> list[tuple[EncodedTensor, ...]]:
        try:
            chain = parse_chain(info.codec)
        except CodecError as exc:
            log.error("the aggregator asked for codec %r: %s; sending uncompressed", info.codec, exc)
            chain = parse_chain("none")
        out = []
        for k in range(self.size):
            rng = np.random.default_rng([self.seed, k])
            delta = {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(DELTA_STD) for name, shape in info.shapes}
            out.append(encode_weights(delta, chain, rng))
        return out

    def get(self, info: RoundInfo, index: int) -> tuple[EncodedTensor, ...]:
        return self._sets[(info.fingerprint, info.codec)][index % self.size]


@dataclass
class Ledger:
    """What a host's agents published and heard back, per round (written to JSON for the report)."""

    rounds: dict[int, dict[str, float]] = field(default_factory=lambda: collections.defaultdict(_round_counts))
    receipts: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)  # refusals by reason code (not_invited, ...)
    superseded: int = 0  # updates still without a receipt when a newer round opened (published or not)

    def trained(self, round_no: int) -> None:
        """A device made an update for this round (a real device would have spent its training on it)."""
        self.rounds[round_no]["trained"] += 1

    def saw_model(self, round_no: int, at: float) -> None:
        """An agent received the round's announcement at wall-clock ``at`` (the fan-out's spread)."""
        counts = self.rounds[round_no]
        counts["model_first"] = min(counts["model_first"] or at, at)
        counts["model_last"] = max(counts["model_last"], at)

    def published(self, round_no: int, nbytes: int) -> None:
        self.rounds[round_no]["updates"] += 1
        self.rounds[round_no]["bytes"] += nbytes

    def evaluated(self, round_no: int) -> None:
        self.rounds[round_no]["evals"] += 1

    def answered(self, round_no: int, status: ReceiptStatus, nbytes: int, reason: str = "") -> None:
        self.receipts[status.value] += 1
        self.rounds[round_no][status.value] += 1
        if status is ReceiptStatus.ACCEPTED:
            self.rounds[round_no]["accepted_bytes"] += nbytes
        elif reason:
            self.reasons[reason.split(":", 1)[0]] += 1
            if reason.startswith("not_invited"):
                self.rounds[round_no]["uninvited"] += 1

    def to_json(self) -> dict[str, Any]:
        return {"rounds": {str(k): v for k, v in sorted(self.rounds.items())}, "receipts": dict(self.receipts),
                "reasons": dict(self.reasons), "superseded": self.superseded}


def _round_counts() -> dict[str, float]:
    return dict.fromkeys(("trained", "updates", "bytes", "accepted", "accepted_bytes", "stale", "rejected", "duplicate",
                          "uninvited", "evals", "model_first", "model_last"), 0)


@dataclass
class _Pending:
    update_id: str
    info: RoundInfo
    num_samples: int
    published: bool = False  # on the current connection
    nbytes: int = 0  # size of the last payload sent


class SyntheticAgent:
    """One simulated device: connects, answers each new round with one update, exits on the final model."""

    def __init__(
        self,
        client_id: str,
        address: BrokerAddress,
        fleet: str,
        pool: DeltaPool,
        *,
        downloads: str = "host",
        seed: int = 0,
        throttle: asyncio.Semaphore | None = None,
        ledger: Ledger | None = None,
        keepalive: int = 60,
    ) -> None:
        if downloads not in DOWNLOADS:
            raise ValueError(f"downloads must be one of {', '.join(DOWNLOADS)}, got {downloads!r}")
        self.client_id = client_id
        self.address = address
        self.fleet = fleet
        self.topics = Topics(fleet)
        self.pool = pool
        self.downloads = downloads
        self.seed = seed
        self.throttle = throttle or asyncio.Semaphore(1)
        self.ledger = ledger or Ledger()
        self.keepalive = keepalive
        self.connected = asyncio.Event()  # set on the first connection
        self.done = asyncio.Event()  # the final model was announced
        self._version = -1  # newest model version answered
        self._evaluated = -1  # newest model version evaluated
        self._evals: list[RoundInfo] = []  # evaluations asked for and not reported yet
        self._pending: _Pending | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ rounds
    def on_model(self, info: RoundInfo) -> None:
        """A GlobalModel was announced (the host's feed, or this agent's own download)."""
        if self._pending is not None and self._pending.info.round < info.round:
            self._pending = None  # its round is over (sync mode): never publish it
            self.ledger.superseded += 1
        if info.asks_eval(self.client_id) and info.version > self._evaluated:
            self._evaluated = info.version
            self._evals.append(info)
        if info.final:
            self.done.set()
        elif info.version > self._version and info.invites(self.client_id):
            self._version = info.version
            rng = random.Random(f"{self.seed}:{self.client_id}:{info.round}")
            self._pending = _Pending(new_update_id(), info, num_samples=rng.randint(20, 200))
            self.ledger.trained(info.round)
        elif self._pending is not None and self._pending.info.version == info.version:
            self._pending.published = False  # re-announced (round extended, aggregator reconnected): resend
        self._wake.set()

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = Receipt.from_bytes(payload, fleet=self.fleet)
        except DecodeError as exc:
            log.warning("%s: unreadable receipt: %s", self.client_id, exc)
            return
        pending = self._pending
        if pending is not None and receipt.update_id == pending.update_id:
            self._pending = None
            self.ledger.answered(pending.info.round, receipt.status, pending.nbytes, receipt.reason)
            if receipt.status is ReceiptStatus.REJECTED:
                log.error("%s: update rejected: %s", self.client_id, receipt.reason)

    def _payload(self, pending: _Pending) -> bytes:
        """Rebuilt for every (re)send, never kept: 1000 agents waiting for receipts hold no payloads."""
        index = zlib.crc32(f"{self.client_id}:{pending.info.round}".encode())
        return Update(
            fleet=self.fleet, client_id=self.client_id, update_id=pending.update_id, round=pending.info.round,
            base_version=pending.info.version, num_samples=pending.num_samples, tensors=self.pool.get(pending.info, index),
            metrics={"train_seconds": 0.0},
        ).to_bytes()

    # ------------------------------------------------------------------ connection
    async def run(self) -> None:
        offline = Presence(self.fleet, self.client_id, "offline", AGENT_VERSION).to_bytes()
        subscriptions = [self.topics.receipt(self.client_id)]
        if self.downloads == "all":
            subscriptions.append(self.topics.global_model)
        async with Connection(
            self.address, f"fedge-agent-{self.client_id}", subscriptions=subscriptions, persistent=True,
            will=aiomqtt.Will(self.topics.presence(self.client_id), offline, qos=QOS, retain=True),
            on_connect=self._on_connect, backoff=Backoff(rng=random.Random(self.client_id)), keepalive=self.keepalive,
        ) as conn:
            self._conn = conn
            # the upload loop ends on the final model; the reader only ends by raising
            await race(self._read(), self._upload())
            await conn.publish(self.topics.presence(self.client_id), offline, retain=True)

    async def _on_connect(self) -> None:
        if self._pending is not None:
            self._pending.published = False  # replay on every reconnect, like the real agent's outbox
        self._wake.set()
        online = Presence(self.fleet, self.client_id, "online", AGENT_VERSION, eligible=True)
        await self._conn.publish(self.topics.presence(self.client_id), online.to_bytes(), retain=True)
        self.connected.set()

    async def _read(self) -> None:
        while True:
            message = await self._conn.messages.get()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if str(message.topic) == self.topics.global_model:
                if not payload:
                    continue
                try:
                    info = RoundInfo.of(GlobalModel.from_bytes(payload, max_bytes=MAX_MODEL_BYTES, fleet=self.fleet))
                except DecodeError as exc:
                    log.error("%s: refusing global model: %s", self.client_id, exc)
                    continue
                self.ledger.saw_model(info.round, time.time())
                if not info.final and info.invites(self.client_id):
                    await self.pool.prepare(info)
                self.on_model(info)
            else:
                self._on_receipt(payload)

    def _eval_report(self, info: RoundInfo) -> bytes:
        """A plausible evaluation, seeded by device and version: accuracy climbs with the version."""
        rng = random.Random(f"{self.seed}:{self.client_id}:eval:{info.version}")
        accuracy = min(1.0, max(0.0, 0.5 + 0.4 * (1 - 0.9**info.version) + rng.gauss(0, 0.05)))
        return EvalReport(self.fleet, self.client_id, info.version, rng.randint(5, 50), max(0.0, 2.0 * (1 - accuracy)), accuracy).to_bytes()

    async def _report_evals(self) -> None:
        while self._evals:
            info = self._evals.pop(0)
            await self._conn.publish(self.topics.evals(self.client_id), self._eval_report(info))
            self.ledger.evaluated(info.round)

    async def _upload(self) -> None:
        """Publish evaluations asked for and the pending update whenever it is new or must be resent; return on the final model."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._report_evals()
            if self.done.is_set():
                return
            pending = self._pending
            if pending is None or pending.published or self.done.is_set():
                continue
            async with self.throttle:  # bounds the payloads a host holds at once
                if pending is not self._pending or pending.published:
                    continue  # superseded or answered while waiting for our turn
                payload = self._payload(pending)
                # Marked before publishing, so that a re-announcement during the publish can unmark it.
                pending.published, pending.nbytes = True, len(payload)
                try:
                    await self._conn.publish(self.topics.update(self.client_id), payload)
                except BaseException:
                    pending.published = False
                    raise
                self.ledger.published(pending.info.round, len(payload))


class ModelFeed(Subscriber):
    """``downloads=host``: one subscriber to the global model per host, fanning rounds out to its agents."""

    def __init__(self, address: BrokerAddress, fleet: str, name: str, pool: DeltaPool, deliver: Callable[[RoundInfo], None]) -> None:
        self.fleet = fleet
        self.pool = pool
        self.deliver = deliver
        self.final = asyncio.Event()
        super().__init__(address, f"fedge-synthetic-feed-{name}", [Topics(fleet).global_model])

    async def on_message(self, topic: str, payload: bytes) -> None:
        info = RoundInfo.of(GlobalModel.from_bytes(payload, max_bytes=MAX_MODEL_BYTES, fleet=self.fleet))
        if not info.final:
            await self.pool.prepare(info)
        self.deliver(info)
        if info.final:
            self.final.set()


def _rss_mib() -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class HostOptions:
    downloads: str = "host"
    seed: int = 0
    pool_size: int = 8  # distinct deltas per (model, codec)
    inflight: int = 8  # updates a host publishes at once (bounds the payloads it holds)
    connect_batch: int = 100  # agents connecting at once: a thousand SYNs at once overflow the broker's listen backlog


async def host_synthetic_agents(client_ids: list[str], address: BrokerAddress, fleet: str, options: HostOptions,
                                *, name: str = "host", ledger_path: Path | None = None) -> int:
    """Run ``client_ids`` as synthetic agents in this process until the final model; write the ledger."""
    from fedge.simulate.limits import raise_fd_limit

    raise_fd_limit(len(client_ids) + 256)
    pool = DeltaPool(options.pool_size, options.seed)
    ledger = Ledger()
    throttle = asyncio.Semaphore(options.inflight)
    agents = [SyntheticAgent(c, address, fleet, pool, downloads=options.downloads, seed=options.seed, throttle=throttle, ledger=ledger)
              for c in client_ids]
    facts: dict[str, Any] = {"agents": len(agents), "rss_mib_before": _rss_mib()}
    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            for start in range(0, len(agents), options.connect_batch):
                batch = agents[start:start + options.connect_batch]
                for agent in batch:
                    group.create_task(agent.run(), name=agent.client_id)
                await asyncio.gather(*(agent.connected.wait() for agent in batch))
            facts["connect_seconds"] = time.monotonic() - started
            facts["rss_mib_connected"] = _rss_mib()
            log.info("%d synthetic agents connected in %.2f s", len(agents), facts["connect_seconds"])
            if options.downloads == "host":
                def deliver(info: RoundInfo) -> None:
                    for agent in agents:
                        agent.on_model(info)

                async with ModelFeed(address, fleet, name, pool, deliver) as feed:
                    await feed.final.wait()
    finally:
        if ledger_path is not None:
            # One small write at the end of the run, synchronous so that a cancelled run still writes it whole.
            ledger_path.write_text(json.dumps({**ledger.to_json(), **facts}, indent=1))  # noqa: ASYNC240
    return 0

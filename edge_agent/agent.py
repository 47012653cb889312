"""The agent's event loop: one MQTT connection, three cooperating tasks.

- dispatch: reads the connection's messages (the retained global model, this device's receipts);
- training: waits for a model version it has not trained on and for the device to be eligible,
  trains in a worker thread, writes the encoded delta to the outbox;
- upload: publishes everything in the outbox, again after every reconnect and periodically until
  a receipt removes it (the aggregator dedupes by update id, so resending is always safe).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import uuid
from dataclasses import dataclass, field

import aiomqtt

from edge_agent.conditions import AlwaysEligible, Gate
from edge_agent.config import AgentConfig
from edge_agent.outbox import Outbox
from edge_agent.state import AgentState
from edge_agent.trainer import FingerprintMismatch, LocalTrainer, LocalUpdate
from fedge_contract import DecodeError, GlobalModel, Presence, Receipt, ReceiptStatus, Topics, Update
from fedge_contract.aio import cancel_and_wait
from fedge_contract.codecs import CodecChain, encode_weights, parse_chain
from fedge_contract.errors import CodecError
from fedge_contract.mqtt import QOS, Backoff, Connection
from fedge_tasks import Task, load_task
from fedge_tasks.runtime import limit_torch_threads

AGENT_VERSION = "0.1.0"
log = logging.getLogger("fedge.agent")


@dataclass
class AgentStats:
    trained_versions: list[int] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    bytes_up: int = 0  # update payloads published (resends included)
    bytes_down: int = 0  # global model payloads received
    last_error: str = ""


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        task: Task | None = None,
        gate: Gate | None = None,
        rng: random.Random | None = None,
        resend_after: float = 120.0,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        self.gate: Gate = gate or AlwaysEligible()
        self.stats = AgentStats()
        self.resend_after = resend_after
        self._executor = executor  # None: asyncio's default; agents sharing a process share one worker
        self._task = task
        self._rng = rng or random.Random()
        self._outbox = Outbox(config.state_dir / "outbox")
        self._state_path = config.state_dir / "state.json"
        self._state = AgentState.load(self._state_path)
        self._latest: GlobalModel | None = None
        self._new_model = asyncio.Event()
        self._outbox_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._published: set[str] = set()  # update ids published on the current connection

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``stop()`` (or the final model, with ``exit_when_final``)."""
        limit_torch_threads(self.config.torch_threads)
        task = self._task or load_task(self.config.task, self.config.task_options)
        self._trainer = await asyncio.to_thread(LocalTrainer, task, self.config.client_id, self.config.seed)
        offline = Presence(self.config.fleet, self.config.client_id, "offline", AGENT_VERSION)
        async with Connection(
            self.config.broker,
            f"fedge-agent-{self.config.client_id}",
            subscriptions=[self.topics.global_model, self.topics.receipt(self.config.client_id)],
            persistent=True,
            will=aiomqtt.Will(self.topics.presence(self.config.client_id), offline.to_bytes(), qos=QOS, retain=True),
            on_connect=self._on_connect,
            backoff=Backoff(self.config.backoff_base, self.config.backoff_cap, self._rng),
            keepalive=self.config.keepalive,
            session_expiry=self.config.session_expiry,
        ) as conn:
            self._conn = conn
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._dispatch(), name="dispatch"),
                    group.create_task(self._train_loop(), name="train"),
                    group.create_task(self._upload_loop(), name="upload"),
                ]
                await self._stop.wait()
                await cancel_and_wait(tasks)
            if conn.connected.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await conn.publish(self.topics.presence(self.config.client_id), offline.to_bytes(), retain=True)

    # ------------------------------------------------------------------ connection
    async def _on_connect(self) -> None:
        self._published.clear()
        self._outbox_changed.set()  # replay the outbox on every (re)connect
        await self._publish_presence()

    async def _publish_presence(self) -> None:
        why_not = self.stats.last_error or self.gate.why_not()
        presence = Presence(self.config.fleet, self.config.client_id, "online", AGENT_VERSION, eligible=not why_not, why_not=why_not)
        await self._conn.publish(self.topics.presence(self.config.client_id), presence.to_bytes(), retain=True)

    async def _dispatch(self) -> None:
        while True:
            message = await self._conn.messages.get()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if str(message.topic) == self.topics.global_model:
                await self._on_global(payload)
            else:
                self._on_receipt(payload)

    async def _on_global(self, payload: bytes) -> None:
        if not payload:
            return  # retained message cleared
        self.stats.bytes_down += len(payload)
        try:
            model = GlobalModel.from_bytes(payload, max_bytes=self.config.max_model_bytes, fleet=self.config.fleet)
            self._trainer.check(model)
        except (DecodeError, FingerprintMismatch) as exc:
            self.stats.last_error = str(exc)
            log.error("%s: refusing global model: %s", self.config.client_id, exc)
            await self._publish_presence()
            return
        if self.stats.last_error:
            self.stats.last_error = ""
            await self._publish_presence()
        for update_id in self._outbox.drop_before(model.round):
            log.info("%s: dropped update %s, its round is over", self.config.client_id, update_id)
        if model.final:
            log.info("%s: training finished at model v%d", self.config.client_id, model.model_version)
            if self.config.exit_when_final:
                self.stop()
            return
        if model.model_version > self._state.trained_version:
            self._latest = model
            self._new_model.set()
        else:
            self._resend_round(model.round)

    def _resend_round(self, round_no: int) -> None:
        """A model we already trained on was announced again (round extended, or the aggregator
        reconnected after a broker crash that may have dropped our upload): resend the round's
        updates that have no receipt yet. Duplicates are answered ``duplicate`` and cleared."""
        unanswered = {p.update_id for p in self._outbox.pending() if p.round == round_no}
        if unanswered & self._published:
            self._published -= unanswered
            self._outbox_changed.set()

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = Receipt.from_bytes(payload, fleet=self.config.fleet)
        except DecodeError as exc:
            log.warning("%s: unreadable receipt: %s", self.config.client_id, exc)
            return
        self.stats.receipts.append(receipt)
        if receipt.update_id and self._outbox.remove(receipt.update_id):
            level = logging.INFO if receipt.status in (ReceiptStatus.ACCEPTED, ReceiptStatus.DUPLICATE) else logging.WARNING
            log.log(level, "%s: update %s %s %s", self.config.client_id, receipt.update_id, receipt.status.value, receipt.reason)

    # ------------------------------------------------------------------ training
    async def _train_loop(self) -> None:
        while True:
            await self._new_model.wait()
            self._new_model.clear()
            model = self._latest
            if model is None or model.model_version <= self._state.trained_version:
                continue
            await self.gate.wait_eligible()
            if self._latest is not model:
                continue  # a newer model arrived while we waited
            loop = asyncio.get_running_loop()
            queued = await loop.run_in_executor(self._executor, self._train_and_queue, model)
            if not queued:
                if self._latest is model:
                    self._new_model.set()  # interrupted by the device's conditions: try again when eligible
                continue
            self.stats.trained_versions.append(model.model_version)
            self._outbox_changed.set()

    def _train_and_queue(self, model: GlobalModel) -> bool:
        """Worker thread: train, encode and write the update to the outbox; False if interrupted."""
        local = self._trainer.run(model, lambda: self.gate.eligible() and self._latest is model)
        if local is None:
            return False
        self._queue_update(model, local)
        return True

    def _queue_update(self, model: GlobalModel, local: LocalUpdate) -> None:
        try:
            chain: CodecChain = parse_chain(model.task.codec)
        except CodecError as exc:
            log.error("%s: the aggregator asked for codec %r: %s; sending uncompressed", self.config.client_id, model.task.codec, exc)
            chain = parse_chain("none")
        result = local.result
        update = Update(
            fleet=self.config.fleet,
            client_id=self.config.client_id,
            update_id=uuid.uuid4().hex,
            round=model.round,
            base_version=model.model_version,
            num_samples=result.num_samples,
            tensors=encode_weights(local.delta, chain),
            metrics={"loss": result.loss, "accuracy": result.accuracy, "train_seconds": result.seconds},
        )
        self._outbox.put(update_id=update.update_id, round_no=update.round, base_version=update.base_version, payload=update.to_bytes())
        self._state.trained_version = model.model_version
        self._state.fingerprint = model.fingerprint
        self._state.save(self._state_path)
        log.info("%s: trained round %d on v%d (%d samples, loss %.4f)", self.config.client_id, model.round, model.model_version, result.num_samples, result.loss)

    # ------------------------------------------------------------------ upload
    async def _upload_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.resend_after):
                    await self._outbox_changed.wait()
            except TimeoutError:
                self._published.clear()  # no receipt for a while: publish again (idempotent)
            self._outbox_changed.clear()
            for pending in self._outbox.pending():
                if pending.update_id in self._published:
                    continue
                try:
                    payload = pending.payload()
                except FileNotFoundError:
                    continue  # its receipt arrived meanwhile
                await self._conn.publish(self.topics.update(self.config.client_id), payload)
                self._published.add(pending.update_id)
                self.stats.bytes_up += len(payload)

"""The agent's event loop: one MQTT connection, three cooperating tasks.

- dispatch: reads the connection's messages (the retained global model, this device's receipts);
  under delta broadcasts the announcement only makes sense against the model the device holds:
  edge_agent/held_model.py keeps that model, catches up from the retained topics, and hands the
  agent a full model to train from once it holds the version (bit for bit, hash checked);
- training: waits for a model version it has not trained on and for the device to be eligible,
  trains (in a child process that exits afterwards, or with ``isolate_training=False`` in a
  worker thread), writes the encoded delta to the outbox;
- upload: publishes everything in the outbox, again after every reconnect and periodically until
  a receipt removes it (the aggregator dedupes by update id, so resending is always safe).
  An update above ``max_message_bytes`` goes as retained chunks plus a manifest, and its chunk
  topics are emptied once it is answered; a global model that arrives as a manifest is fetched
  chunk by chunk and used only when complete and verified (fedge_contract/chunks.py).
- conditions: when the gate's eligibility flips, re-publishes presence (conditions, why not).
- settle: on the final model, waits briefly for the last receipts, then drops what is still
  unanswered; every update dropped unanswered is a WARNING and counted in presence (edge_agent/settle.py).

The agent's own files (the outbox's writes, reads and removes, the residual, the state) are read
and written on a thread, one operation at a time in the order the loop asked for them
(``_on_disk``), so an fsync on a slow SD card never stalls the connection's keepalives, PUBACKs
and receipts. The order is what keeps a crash harmless: the outbox entry is on disk before it is
published, the residual is saved after the outbox entry, the state after both; each file is
written atomically (edge_agent/files.py).

This module does not import torch: an agent that isolates its training stays at ~40 MiB while it
waits; torch is imported only by the training child (or, in-thread, when ``run()`` starts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt
import numpy as np

from edge_agent.attack import attacked
from edge_agent.conditions import AlwaysEligible, Gate
from edge_agent.config import AgentConfig
from edge_agent.errors import FingerprintMismatch, TrainingFailed
from edge_agent.held_model import Failed, Follower, HeldFiles, HeldStats, Ready, initial_rebuilder
from edge_agent.outbox import Outbox
from edge_agent.participation import EvalOutcome, Evaluations
from edge_agent.participation import plan as participation_plan
from edge_agent.residuals import Residuals
from edge_agent.secure_rounds import is_secure, secure_aggregation
from edge_agent.seeds import training_seed
from edge_agent.settle import Settlement
from edge_agent.state import AgentState
from edge_agent.train_worker import ChildUpdate, StopSignal, TrainJob, describe_in_child, evaluate_in_child, train_in_child
from fedge_contract import DecodeError, GlobalModel, Presence, Receipt, ReceiptStatus, Topics, Update, new_update_id
from fedge_contract.aio import cancel_and_wait
from fedge_contract.broadcast import decode_announcement
from fedge_contract.chunks import ChunkLimits, Manifest, is_manifest
from fedge_contract.codecs import CodecChain, parse_chain
from fedge_contract.errors import CodecError, Reason
from fedge_contract.mqtt import QOS, Backoff, Connection
from fedge_contract.tensors import ModelSpec
from fedge_contract.transfer import WAKE_TOPIC, ChunkReceiver, Received, Refused, clear_chunks, send_chunked

if TYPE_CHECKING:
    from edge_agent.evaluator import LocalEvaluator
    from edge_agent.trainer import LocalTrainer, LocalUpdate
    from fedge_tasks import Task

R = TypeVar("R")

AGENT_VERSION = "0.1.0"
_CODEC_STREAM = 0xC0DEC  # separates the codec's random stream from the training shuffle's
log = logging.getLogger("fedge.agent")


def staleness_window(model: GlobalModel) -> int | None:
    """In async (FedBuff) mode, how many versions old an update may be; None in sync mode.

    The aggregator says so in the task's extra fields (``mode``, ``max_staleness``): a sync
    agent ignores them, so old agents keep working against an async aggregator (they only drop
    pending updates a little early and restart training when a newer model arrives).
    """
    if model.task.extra.get("mode") != "async":
        return None
    window = model.task.extra.get("max_staleness", 0)
    return window if isinstance(window, int) and window >= 0 else 0


@dataclass
class AgentStats:
    trained_versions: list[int] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    bytes_up: int = 0  # update payloads published (resends included)
    bytes_down: int = 0  # every message received under global/ (announcements, their chunks, catch-up, the task)
    last_error: str = ""
    held: HeldStats = field(default_factory=HeldStats)  # delta broadcasts: accepted, caught up, fell back, refusals


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
        self._residuals = Residuals(config.state_dir)
        self._state_path = config.state_dir / "state.json"
        self._state = AgentState.load(self._state_path)
        self._latest: GlobalModel | None = None
        self._latest_payload = b""
        self._spec = ModelSpec(())  # the task's model, learnt when run() starts
        self._initial: dict[str, np.ndarray] | None = None  # its version 0, as this device builds it (delta broadcasts)
        self._follower: Follower | None = None  # the held model under delta broadcasts (created per connection owner)
        self._held_files: HeldFiles | None = None
        self._held_changed = asyncio.Event()  # the held model moved on: the keeper writes it (the latest only)
        self._trainer: LocalTrainer | None = None
        self._abort: StopSignal | None = None  # stops the training child (ineligible, superseded)
        self._new_model = asyncio.Event()
        self._outbox_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._published: set[str] = set()  # update ids published on the current connection
        self._chunked: dict[str, int] = {}  # update id -> chunks published retained (cleared once answered)
        self._to_clear: dict[str, int] = {}  # the same, for answered updates whose chunks the upload task clears
        self._disk = asyncio.Lock()  # one file operation at a time, in the order asked (see the module docstring)
        self._settlement = Settlement(config.client_id, self._outbox, self._state, self._state_path, on_disk=self._on_disk,
                                      forget=self._answered, announce=self._announce_dropped, grace=config.final_receipt_grace)
        self._evaluator: LocalEvaluator | None = None  # in-thread federated evaluation, made on first use
        self.evaluations = Evaluations(config.client_id, self.topics, evaluate=self._evaluate, publish=self._publish_eval,
                                       wait_eligible=self.gate.wait_eligible)  # edge_agent/participation.py
        # On the final model: the outbox settled (receipts, else dropped and counted) and its evaluation reported, if asked.
        self._final_settled = asyncio.Event()
        self._final_evaluated = asyncio.Event()
        # Secure rounds (issue 17): the delta goes to a protocol session instead of the outbox.
        self._secure = secure_aggregation(fleet=config.fleet, client_id=config.client_id, state_dir=config.state_dir,
                                          max_message_bytes=config.max_message_bytes, seed=config.seed, on_change=self._presence_if_connected)

    def stop(self) -> None:
        self._stop.set()

    async def _on_disk(self, operation: Callable[..., R], *args: Any) -> R:
        """Run a file operation on a thread, after those asked before it; the loop serves the connection meanwhile."""
        async with self._disk:
            return await asyncio.to_thread(operation, *args)

    async def run(self) -> None:
        """Serve until ``stop()`` (or the final model, with ``exit_when_final``)."""
        await self._load_task()
        dropped_at_start = self._settlement.dropped
        async with Connection(
            self.config.broker,
            f"fedge-agent-{self.config.client_id}",
            subscriptions=[self.topics.global_model, self.topics.receipt(self.config.client_id), *self._secure.subscriptions()],
            persistent=True,
            will=self._will(),
            on_connect=self._on_connect,
            backoff=Backoff(self.config.backoff_base, self.config.backoff_cap, self._rng),
            keepalive=self.config.keepalive,
            session_expiry=self.config.session_expiry,
        ) as conn:
            self._conn = conn
            self._secure.attach(conn, self._spec)
            limits = ChunkLimits(max_size=self.config.max_model_bytes, max_concurrent=1, timeout=self.config.chunk_timeout)
            self._fetch = ChunkReceiver(conn, self.topics, limits, bad_chunk="skip")
            self._follower = await self._make_follower(conn)
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._dispatch(), name="dispatch"),
                    group.create_task(self._train_loop(), name="train"),
                    group.create_task(self._upload_loop(), name="upload"),
                    group.create_task(self._watch_conditions(), name="conditions"),
                    group.create_task(self._settlement.run(self._final_settled.set), name="settle"),
                    group.create_task(self.evaluations.run(), name="evaluate"),
                    group.create_task(self._exit_when_final(), name="exit-when-final"),
                    group.create_task(self._keep_held(), name="held"),
                ]
                await self._stop.wait()
                await cancel_and_wait(tasks)
            self._fetch.close()
            self._follower.close()
            if self._held_files is not None:  # a stop between two writes: keep the latest held model too
                await self._on_disk(self._held_files.save, self._follower.rebuilder, self._follower.task)
            # The last presence, with the final count. Offline now, the broker holds a will made at the last
            # connect: if updates were dropped this run, it may be older than the count, so wait for the connection.
            if conn.connected.is_set() or self._settlement.dropped != dropped_at_start:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await conn.publish(self.topics.presence(self.config.client_id), self._offline().to_bytes(), retain=True)

    async def _load_task(self) -> None:
        """Learn the task's model spec; task errors surface here, before connecting."""
        if self.config.isolate_training:
            self._spec, self._initial = await describe_in_child(self._job())
            return
        from edge_agent.trainer import LocalTrainer
        from fedge_tasks import load_task
        from fedge_tasks.runtime import limit_torch_threads

        limit_torch_threads(self.config.torch_threads)
        task = self._task = self._task or load_task(self.config.task, self.config.task_options)
        self._trainer = await asyncio.to_thread(LocalTrainer, task, self.config.client_id, self.config.seed)
        self._spec = self._trainer.spec
        from fedge_tasks.weights import get_weights

        self._initial = get_weights(self._trainer.model)  # before any training: version 0 as this device builds it

    async def _make_follower(self, conn: Connection) -> Follower:
        """The held model: kept from the last run (state folder), else this device's own build of version 0."""
        files = HeldFiles(self.config.state_dir, self._spec)
        kept = await self._on_disk(files.load)
        rebuilder, task = initial_rebuilder(self._spec, kept, self._initial)
        self._initial = None  # the rebuilder holds its own copy
        self._held_files = files
        return Follower(conn, self.topics, rebuilder, task=task, max_bytes=self.config.max_model_bytes,
                        timeout=self.config.chunk_timeout, stats=self.stats.held)

    def _job(self) -> TrainJob:
        return TrainJob(
            task=self.config.task, task_options=dict(self.config.task_options), client_id=self.config.client_id,
            seed=self.config.seed, fleet=self.config.fleet, max_model_bytes=self.config.max_model_bytes,
            torch_threads=self.config.torch_threads, nice=self.config.train_nice,
            max_data_mib=self.config.max_train_memory_mib, log_level=logging.getLevelName(logging.getLogger().level).lower(),
        )

    def _device(self) -> dict[str, Any]:
        device = getattr(self.gate, "device", None)
        return {**(dict(device()) if callable(device) else {}), **self._secure.presence_fields()}

    # ------------------------------------------------------------------ connection
    async def _on_connect(self) -> None:
        self._published.clear()
        self._outbox_changed.set()  # replay the outbox on every (re)connect
        await self._publish_presence()

    async def _publish_presence(self) -> None:
        why_not = self.stats.last_error or self.gate.why_not()
        presence = Presence(
            self.config.fleet, self.config.client_id, "online", AGENT_VERSION,
            eligible=not why_not, why_not=why_not, device=self._device(), dropped=self._settlement.dropped,
        )
        await self._conn.publish(self.topics.presence(self.config.client_id), presence.to_bytes(), retain=True)

    def _offline(self) -> Presence:
        return Presence(self.config.fleet, self.config.client_id, "offline", AGENT_VERSION, dropped=self._settlement.dropped)

    def _will(self) -> aiomqtt.Will:
        """What the broker publishes when a connection dies: offline, with the count as of now.

        A will is fixed at connect, so it stays current only from the next connection on (issue 19:
        one made at start said 0 after every reset of a device that had dropped updates since).
        """
        return aiomqtt.Will(self.topics.presence(self.config.client_id), self._offline().to_bytes(), qos=QOS, retain=True)

    async def _announce_dropped(self) -> None:
        """The count of dropped updates changed: in the next connection's will, and in the presence now if connected."""
        conn: Connection | None = getattr(self, "_conn", None)  # None before run() connects
        if conn is None:
            return
        conn.will = self._will()
        await self._presence_if_connected()

    async def _presence_if_connected(self) -> None:
        """The presence now, if connected (else the next connection publishes it)."""
        conn: Connection | None = getattr(self, "_conn", None)  # None before run() connects
        if conn is not None and conn.connected.is_set():
            await self._publish_presence()

    async def _dispatch(self) -> None:
        while True:
            message = await self._conn.messages.get()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            topic = str(message.topic)
            if topic.startswith(self.topics.global_model):
                self.stats.bytes_down += len(payload)  # what this device downloads, catch-up and chunks included
            if topic == WAKE_TOPIC:  # a chunk timer of either receiver: both check what stalled
                for outcome in await self._fetch.handle(topic, payload):
                    await self._on_fetched(outcome)
                for held in await self._following().handle(topic, payload):
                    await self._on_held(held)
            elif topic == self.topics.global_model and is_manifest(payload):
                await self._on_global_manifest(payload)
            elif topic == self.topics.global_model:
                for key in list(self._fetch.keys()):
                    await self._fetch.cancel(key)  # a whole model supersedes the one being fetched
                await self._on_global(payload)
            elif self._follower is not None and self._follower.owns(topic):
                for held in await self._follower.handle(topic, payload):
                    await self._on_held(held)
            elif self._fetch.owns(topic):
                for outcome in await self._fetch.handle(topic, payload):
                    await self._on_fetched(outcome)
            elif self._secure.owns(topic):
                await self._secure.on_message(topic, payload)
            else:
                await self._on_receipt(payload)

    async def _on_global_manifest(self, payload: bytes) -> None:
        """The global model is too large for one message: fetch its chunks (then ``_on_fetched``)."""
        try:
            manifest = Manifest.from_bytes(payload, max_size=self.config.max_model_bytes, fleet=self.config.fleet)
            if manifest.kind != "global":
                raise DecodeError(Reason.BAD_VALUE, f"a {manifest.kind} manifest on the global model's topic")
            assert manifest.model_version is not None
            for key in list(self._fetch.keys()):
                if key != self.topics.global_chunks(manifest.model_version):
                    await self._fetch.cancel(key)  # a newer version supersedes the one being fetched
            await self._fetch.offer(manifest)
        except DecodeError as exc:
            await self._refuse_global(exc)

    async def _on_fetched(self, outcome: Received | Refused) -> None:
        if isinstance(outcome, Received):
            await self._on_global(outcome.payload, manifest_version=outcome.manifest.model_version)
        else:
            await self._refuse_global(outcome.error)

    async def _refuse_global(self, exc: Exception) -> None:
        self.stats.last_error = str(exc)
        log.error("%s: refusing global model: %s", self.config.client_id, exc)
        await self._publish_presence()

    def _following(self) -> Follower:
        """The Follower of the held model (it exists while the connection does)."""
        assert self._follower is not None
        return self._follower

    async def _on_global(self, payload: bytes, *, manifest_version: int | None = None) -> None:
        if not payload:
            return  # retained message cleared
        try:
            model = decode_announcement(payload, max_bytes=self.config.max_model_bytes, fleet=self.config.fleet)
            if manifest_version is not None and model.model_version != manifest_version:
                raise DecodeError(Reason.BAD_VALUE, f"the manifest announced v{manifest_version}, its chunks hold v{model.model_version}")
            if self._trainer is not None and isinstance(model, GlobalModel):
                self._trainer.check(model)  # in-thread training: the trainer knows its model
            elif model.fingerprint != self._spec.fingerprint:  # the spec the trainer or the training child reported
                raise FingerprintMismatch(
                    f"global model v{model.model_version} has architecture {model.fingerprint}, this device's task "
                    f"builds {self._spec.fingerprint}: the agent and the aggregator must run the same task"
                )
        except (DecodeError, FingerprintMismatch) as exc:
            await self._refuse_global(exc)
            return
        if isinstance(model, GlobalModel) and model.held_hash is None:
            await self._on_model(model, payload)  # a plain full model (no delta broadcasts): trained on as it came
            return
        for held in await self._following().offer(model):  # delta broadcasts: train from the model held
            await self._on_held(held)

    async def _on_held(self, outcome: Ready | Failed) -> None:
        """A version the held model reached (persisted, then trained on), or one it could not (said why)."""
        if isinstance(outcome, Failed):
            await self._refuse_global(outcome.error)
            if outcome.announcement.final:  # training is over all the same: settle the outbox, nothing to evaluate
                log.info("%s: training finished at model v%d (not held here)", self.config.client_id, outcome.announcement.model_version)
                self._latest = None
                self._settlement.on_model(final=True)
                self._final_evaluated.set()
            return
        self._held_changed.set()
        await self._on_model(outcome.model, b"")

    async def _keep_held(self) -> None:
        """Write the held model to the state folder whenever it moved on, the latest only (a version that
        came and went while a write was under way is never written): the next start catches up from it."""
        while True:
            await self._held_changed.wait()
            self._held_changed.clear()
            follower, files = self._following(), self._held_files
            assert files is not None
            await self._on_disk(files.save, follower.rebuilder, follower.task)  # nothing to do if that version is on disk

    async def _on_model(self, model: GlobalModel, payload: bytes) -> None:
        """A model to train from: ``payload`` is its bytes as they came, or empty (built from the held model)."""
        if self.stats.last_error:
            self.stats.last_error = ""
            await self._publish_presence()
        await self._secure.on_announcement(model)
        await self._settlement.round_over(model.round - (staleness_window(model) or 0))
        self._settlement.on_model(final=model.final)
        if model.final:
            log.info("%s: training finished at model v%d", self.config.client_id, model.model_version)
            self._latest = None  # no more training: a model being trained is superseded
            if self._abort is not None:
                self._abort.set()
            self._offer_eval(model, payload, then=self._final_evaluated.set)
            return
        self._offer_eval(model, payload)
        if not participation_plan(model, self.config.client_id).train:
            log.info("%s: round %d's cohort does not invite this device", self.config.client_id, model.round)
            return
        if model.model_version > self._state.trained_version:
            self._latest = model
            self._latest_payload = payload
            self._new_model.set()
            if self._abort is not None and staleness_window(model) is None:
                self._abort.set()  # sync mode: the model being trained is superseded
        else:
            await self._resend_round(model.round)

    async def _exit_when_final(self) -> None:
        """With ``exit_when_final``: stop once the final model's outbox is settled and its evaluation reported."""
        if not self.config.exit_when_final:
            return
        await self._final_settled.wait()
        await self._final_evaluated.wait()
        self.stop()

    def _offer_eval(self, model: GlobalModel, payload: bytes, *, then: Callable[[], None] | None = None) -> None:
        """Evaluate ``model`` if the announcement asks this device to (then ``then``); else ``then`` at once."""
        if participation_plan(model, self.config.client_id).evaluate:
            self.evaluations.offer(model, payload, then=then)
        elif then is not None:
            then()

    async def _evaluate(self, model: GlobalModel, payload: bytes) -> EvalOutcome | None:
        if self.config.isolate_training:
            return await evaluate_in_child(self._job(), payload or model.to_bytes())  # empty: built from the held model
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._evaluate_here, model)

    def _evaluate_here(self, model: GlobalModel) -> EvalOutcome | None:
        """Worker thread: federated evaluation with a model of its own (the trainer's stays untouched)."""
        if self._evaluator is None:
            from edge_agent.evaluator import LocalEvaluator

            assert self._task is not None
            self._evaluator = LocalEvaluator(self._task, self.config.client_id)
        return self._evaluator.run(model)

    async def _publish_eval(self, topic: str, payload: bytes) -> None:
        await self._conn.publish(topic, payload)

    async def _resend_round(self, round_no: int) -> None:
        """A model we already trained on was announced again (round extended, or the aggregator
        reconnected after a broker crash that may have dropped our upload): resend the round's
        updates that have no receipt yet. Duplicates are answered ``duplicate`` and cleared."""
        unanswered = {p.update_id for p in await self._on_disk(self._outbox.pending) if p.round == round_no}
        if unanswered & self._published:
            self._published -= unanswered
            self._outbox_changed.set()

    async def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = Receipt.from_bytes(payload, fleet=self.config.fleet)
        except DecodeError as exc:
            log.warning("%s: unreadable receipt: %s", self.config.client_id, exc)
            return
        self.stats.receipts.append(receipt)
        if receipt.update_id and receipt.reason.startswith(f"{Reason.INCOMPLETE.value}:"):
            # Its chunks did not all reach the aggregator (a broker that lost retained messages):
            # the update itself is fine, so publish it again rather than drop it.
            log.warning("%s: update %s: %s; sending it again", self.config.client_id, receipt.update_id, receipt.reason)
            self._published.discard(receipt.update_id)
            self._outbox_changed.set()
            return
        if not receipt.update_id:
            return
        self._answered(receipt.update_id)
        removed: bool = await self._on_disk(self._outbox.remove, receipt.update_id)
        self._settlement.answered()
        if removed:
            level = logging.INFO if receipt.status in (ReceiptStatus.ACCEPTED, ReceiptStatus.DUPLICATE) else logging.WARNING
            log.log(level, "%s: update %s %s %s", self.config.client_id, receipt.update_id, receipt.status.value, receipt.reason,
                    extra={"client": self.config.client_id, "update": receipt.update_id, "round": receipt.round,
                           "status": receipt.status.value, "reason": receipt.reason})

    def _answered(self, update_id: str) -> None:
        """An update needs no more sending: have the upload task empty its retained chunk topics."""
        count = self._chunked.pop(update_id, None)
        if count:
            self._to_clear[update_id] = count
            self._outbox_changed.set()

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
            local: LocalUpdate | ChildUpdate | None
            if self.config.isolate_training:
                local = await self._train_isolated(self._latest_payload or model.to_bytes())
            else:
                local = await loop.run_in_executor(self._executor, self._train, model)
            if local is None:
                if self._latest is model:
                    self._new_model.set()  # interrupted by the device's conditions: try again when eligible
                continue
            await self._emulate_slow_device(local.result.seconds)
            if is_secure(model):  # a secure round: the delta goes to the protocol session, never out in the clear
                await self._secure.submit(model, local.delta, local.result.num_samples)
                await self._on_disk(self._mark_trained, model)
                log.info("%s: trained secure round %d on v%d (%d samples, loss %.4f)", self.config.client_id, model.round,
                         model.model_version, local.result.num_samples, local.result.loss,
                         extra={"client": self.config.client_id, "round": model.round})
                self.stats.trained_versions.append(model.model_version)
                continue
            update, payload, residual = await loop.run_in_executor(self._executor, self._encode_update, model, local)
            await self._on_disk(self._persist_update, model, update, payload, residual)
            log.info("%s: trained round %d on v%d (%d samples, loss %.4f)", self.config.client_id, model.round, model.model_version,
                     update.num_samples, local.result.loss,
                     extra={"client": self.config.client_id, "update": update.update_id, "round": model.round})
            self.stats.trained_versions.append(model.model_version)
            self._outbox_changed.set()

    async def _train_isolated(self, payload: bytes) -> ChildUpdate | None:
        """Train in a child process that stops between batches when the gate breaks; None if interrupted."""
        stop = StopSignal()
        self._abort = stop
        watcher = asyncio.create_task(self._stop_when_ineligible(stop), name="train-watch")
        try:
            return await train_in_child(self._job(), payload, stop)
        except (FingerprintMismatch, TrainingFailed) as exc:
            # Retrying at once would fail the same way: say why, and wait for the next model.
            self.stats.last_error = f"training failed: {exc}"
            log.error("%s: %s", self.config.client_id, self.stats.last_error)
            self._latest = None
            await self._publish_presence()
            return None
        finally:
            self._abort = None
            await cancel_and_wait([watcher])

    async def _stop_when_ineligible(self, stop: StopSignal) -> None:
        """For gates that cannot notify (no ``wait_change``): ask once a second, only while training."""
        if callable(getattr(self.gate, "wait_change", None)):
            return  # _watch_conditions stops the child the moment eligibility flips
        while self.gate.eligible():  # noqa: ASYNC110 - this gate cannot notify: polling it once a second is the design
            await asyncio.sleep(1.0)
        stop.set()

    async def _watch_conditions(self) -> None:
        """Re-publish presence whenever the device's eligibility flips (no polling)."""
        wait_change = getattr(self.gate, "wait_change", None)
        if not callable(wait_change):
            return
        while True:
            await wait_change()
            if self._abort is not None and not self.gate.eligible():
                self._abort.set()  # before anything else: the child stops at its next batch
            if self._conn.connected.is_set():
                await self._publish_presence()

    def _train(self, model: GlobalModel) -> LocalUpdate | None:
        """Worker thread: train; None if interrupted.

        Sync mode abandons a version as soon as a newer one arrives (its round is over). Async
        mode does not: versions come every few updates, and a slow device that restarted on each
        one would never finish; its update stays useful up to ``max_staleness`` versions.
        """
        assert self._trainer is not None
        if staleness_window(model) is None:
            return self._trainer.run(model, lambda: self.gate.eligible() and self._latest is model)
        return self._trainer.run(model, self.gate.eligible)

    async def _emulate_slow_device(self, train_seconds: float) -> None:
        """Simulation only: make this device look ``slowdown`` times slower (sleeps on the loop, not the worker)."""
        emulated = max(train_seconds, self.config.emulated_train_seconds) * self.config.slowdown
        if emulated > train_seconds:
            await asyncio.sleep(emulated - train_seconds)

    def _encode_update(
        self, model: GlobalModel, local: LocalUpdate | ChildUpdate
    ) -> tuple[Update, bytes, dict[str, np.ndarray] | None]:
        """Worker thread: the update, its bytes and the new residual (``_persist_update`` writes them)."""
        try:
            chain: CodecChain = parse_chain(model.task.codec)
        except CodecError as exc:
            log.error("%s: the aggregator asked for codec %r: %s; sending uncompressed", self.config.client_id, model.task.codec, exc)
            chain = parse_chain("none")
        result = local.result
        # Error feedback: encode delta + residual, keep what the aggregator will not rebuild.
        # The rounding dither is seeded per (seed, device, round) so reruns send the same bytes.
        rng = np.random.default_rng([training_seed(self.config.seed, self.config.client_id, model.round), _CODEC_STREAM])
        delta = attacked(local.delta, self.config.attack)  # test-only knob; "none" outside bench/poisoning
        tensors, residual = self._residuals.encode(delta, chain, self._spec, rng)
        update = Update(
            fleet=self.config.fleet,
            client_id=self.config.client_id,
            update_id=new_update_id(),
            round=model.round,
            base_version=model.model_version,
            num_samples=result.num_samples,
            tensors=tensors,
            metrics={"loss": result.loss, "accuracy": result.accuracy, "train_seconds": result.seconds},
            device=self._device(),
        )
        # the compact form when the aggregator asks for it (fedge_contract.compact): ~160 bytes less
        return update, update.to_bytes(compact=model.task.update_form == "compact"), residual

    def _persist_update(self, model: GlobalModel, update: Update, payload: bytes, residual: dict[str, np.ndarray] | None) -> None:
        """Disk thread: the outbox entry, then the residual, then the state (the order a crash needs)."""
        self._outbox.put(update_id=update.update_id, round_no=update.round, base_version=update.base_version, payload=payload)
        if residual is not None:  # after the outbox: a crash in between re-adds, never loses, what was left out
            self._residuals.save(self._spec, residual)
        self._mark_trained(model)

    def _mark_trained(self, model: GlobalModel) -> None:
        """Disk thread: this version is trained on (its delta is queued, in the outbox or the secure input)."""
        self._state.trained_version = model.model_version
        self._state.fingerprint = model.fingerprint
        self._state.save(self._state_path)

    # ------------------------------------------------------------------ upload
    async def _upload_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.resend_after):
                    await self._outbox_changed.wait()
            except TimeoutError:
                self._published.clear()  # no receipt for a while: publish again (idempotent)
            self._outbox_changed.clear()
            while self._to_clear:
                update_id, count = self._to_clear.popitem()
                await clear_chunks(self._conn, self.topics.update_chunks(self.config.client_id, update_id), count)
            for pending in await self._on_disk(self._outbox.pending):
                if pending.update_id in self._published:
                    continue
                try:
                    payload = await self._on_disk(pending.payload)
                except FileNotFoundError:
                    continue  # its receipt arrived meanwhile
                # Marked before publishing, so that a receipt asking for it again ("incomplete") or
                # a re-announcement that arrives while the publish waits for its PUBACK can unmark it.
                self._published.add(pending.update_id)
                try:
                    await self._publish_update(pending.update_id, payload)
                except BaseException:
                    self._published.discard(pending.update_id)
                    raise
                self.stats.bytes_up += len(payload)

    async def _publish_update(self, update_id: str, payload: bytes) -> None:
        """One message up to ``max_message_bytes``; above, retained chunks and then a manifest that
        the aggregator follows to them (resending republishes the same bytes: idempotent)."""
        topic = self.topics.update(self.config.client_id)
        if len(payload) <= self.config.max_message_bytes:
            await self._conn.publish(topic, payload)
            return
        manifest = Manifest.of(payload, fleet=self.config.fleet, kind="update", chunk_size=self.config.max_message_bytes,
                               client_id=self.config.client_id, update_id=update_id)
        self._chunked[update_id] = manifest.count
        await send_chunked(self._conn, self.topics, manifest, payload, topic=topic, retain=False)

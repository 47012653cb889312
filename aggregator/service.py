"""The aggregator service: the synchronous round loop over one MQTT connection.

One task reads the connection's message queue and owns all round state, so no locks are needed:
an update is decoded, checked, persisted, folded and answered before the next one is read. The
order of effects follows DESIGN.md: an accepted update is spooled to the store before its
receipt; a new model's checkpoint is committed before the model is published.

``Endpoint`` is what the aggregator shares with its ingest workers (``--workers N``,
aggregator/worker.py): every message of a connection enters through ``_dispatch``, and an
update goes through ``aggregator.ingest.Ingest``. This module imports torch only when the
aggregator runs (for the task's model and evaluation), so a worker importing it stays small.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiomqtt
import numpy as np

from aggregator.async_rounds import AsyncBuffer
from aggregator.chunked import Assembled, ChunkedUpdates, publish_global
from aggregator.config import AggregatorConfig
from aggregator.dashboard import DashboardServer, fleet_state
from aggregator.defence import Collector, Defence
from aggregator.errors import StoreMismatch
from aggregator.ingest import Admission, Ingest, LedgerAdmission, limits_for
from aggregator.metrics import AggregatorMetrics, MetricsServer
from aggregator.rounds import DeadlineAction, OpenRound
from aggregator.store import Store
from aggregator.strategies import Strategy, make_strategy
from fedge_contract import (
    GlobalModel,
    Presence,
    ReceiptStatus,
    RoundState,
    RoundStatus,
    TaskConfig,
    Topics,
    Update,
)
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.errors import DecodeError
from fedge_contract.mqtt import Connection
from fedge_contract.tensors import ModelSpec

if TYPE_CHECKING:
    from fedge_tasks import Task

log = logging.getLogger("fedge.aggregator")

STATUS_INTERVAL = 0.5  # seconds: RoundStatus at most this stale while updates keep coming

Round = OpenRound | AsyncBuffer  # sync round or async (FedBuff) buffer: the helpers below serve both


def training_config(task: Task, overrides: dict[str, Any]) -> TaskConfig:
    """The round's TaskConfig: contract defaults < the task's suggestion < explicit overrides."""
    suggested: dict[str, Any] = getattr(task, "suggested_training", dict)()
    return TaskConfig(**{**suggested, **overrides})


class Endpoint:
    """One MQTT connection's way in: the aggregator's, or an ingest worker's (aggregator/worker.py).

    Every message enters through ``_dispatch``; an update is answered by ``self.ingest`` and, if
    accepted, reported to ``_on_accepted``. Subclasses say which round admits it (``_admission``).
    Receipts are released by Ingest's timer, or after a message that filled a batch.
    """

    config: AggregatorConfig
    topics: Topics
    conn: Connection
    ingest: Ingest
    chunked: ChunkedUpdates | None = None  # large updates in chunks (aggregator/chunked.py), made on first use

    async def _dispatch(self, message: aiomqtt.Message, rnd: Round) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else bytes(str(message.payload or ""), "utf-8")
        client = self.topics.client_of(topic)
        if self._chunks().claims(topic, payload):
            await self._on_chunked(topic, payload, rnd)
        elif client is None:
            log.warning("ignored message on unexpected topic %r", topic)
        elif topic == self.topics.presence(client):
            self._on_presence(client, payload)
        else:
            await self._on_update(client, payload, rnd)
        if self.ingest.due():
            self.ingest.release()

    def _publish_soon(self, topic: str, payload: bytes) -> None:
        self.conn.publish_soon(topic, payload)

    def _on_presence(self, client: str, payload: bytes) -> None:
        log.debug("ignored presence of %s", client)

    def _chunks(self) -> ChunkedUpdates:
        if self.chunked is None:
            self.chunked = ChunkedUpdates(self.topics, timeout=self.config.chunk_timeout)
        return self.chunked

    async def _on_chunked(self, topic: str, payload: bytes, rnd: Round) -> None:
        """A manifest, chunk or chunk timer: a reassembled update takes the ordinary path, a refused one gets its receipt."""
        for done in await self._chunks().handle(self.conn, topic, payload, max_bytes=self.ingest.limits.max_bytes):
            if isinstance(done, Assembled):
                await self._on_update(done.client, done.payload, rnd)
            else:
                self.ingest.receipt(done.client, done.update_id, ReceiptStatus.REJECTED, done.reason, self._admission(rnd), done.nbytes)

    async def _on_update(self, client: str, payload: bytes, rnd: Round) -> None:
        update = self.ingest.handle(client, payload, self._admission(rnd))
        if update is not None:
            await self._on_accepted(rnd, update)

    def _admission(self, rnd: Round) -> Admission:
        raise NotImplementedError

    async def _on_accepted(self, rnd: Round, update: Update) -> None:
        """An update of ``rnd`` was accepted, spooled and folded (its receipt is queued)."""


class Aggregator(Endpoint):
    """Runs ``config.rounds`` synchronous rounds (resuming from the store), then publishes the final model."""

    sharded = False  # ShardedAggregator (aggregator/sharded.py) runs --workers

    def __init__(self, config: AggregatorConfig, *, task: Task | None = None, clock: Callable[[], float] = time.time) -> None:
        if config.workers and not self.sharded:
            raise ValueError("--workers needs the sharded aggregator: build it with aggregator.make_aggregator(config)")
        self.config = config
        self.topics = Topics(config.fleet)
        self.clock = clock
        self.counters: collections.Counter[str] = collections.Counter()
        self.online: set[str] = set()
        self.metrics = AggregatorMetrics()  # Prometheus; served only with config.metrics_port
        self.metrics_server: MetricsServer | None = None
        self.dashboard_server: DashboardServer | None = None  # served only with config.dashboard_port
        self.devices: dict[str, Presence] = {}  # last presence of each device (the dashboard's fleet table)
        self.status: RoundStatus | None = None  # last status published
        self._task = task
        self._strategy: Strategy = make_strategy(config.strategy, config.strategy_params)
        self._global_chain = parse_chain(config.global_codec)
        self.defence = Defence(config)  # norm bound, weight cap, robust rule, DP
        self.version = 0
        self.epoch: int | None = None  # this aggregator's hold on the store (Store.take_over)
        self.last_metrics: dict[str, float] = {}
        self._announced: Round | None = None  # the round whose model is out, until it closes
        self._status_dirty = False  # accepted updates not yet in a published RoundStatus
        self._status_at = 0.0  # time.monotonic() of the last RoundStatus published for accepted updates

    async def run(self) -> None:
        from fedge_tasks import load_task
        from fedge_tasks.runtime import limit_torch_threads
        from fedge_tasks.weights import get_weights

        task = self._task or load_task(self.config.task, self.config.task_options)
        limit_torch_threads(1)
        self._model = task.build_model()
        self._eval_data = task.eval_data() if self.config.evaluate else None
        self._loss = getattr(task, "loss", None)
        initial = get_weights(self._model)
        self.spec = ModelSpec.of(initial)
        self.limits = limits_for(self.config, self.spec)
        self.training = training_config(task, dict(self.config.training))
        with Store(self.config.store, fsync=self.config.durability == "disk") as store:
            self.store = store
            self.ingest = Ingest(
                fleet=self.config.fleet, spec=self.spec, limits=self.limits, defence=self.defence, store=store,
                send=self._publish_soon, answered=self._count_receipt, log=log, loop=asyncio.get_running_loop(),
            )
            self.weights = self._resume(initial)
            self.metrics.model_version.set(self.version)
            async with contextlib.AsyncExitStack() as stack:
                if self.config.metrics_port is not None:
                    server = MetricsServer(self.metrics.exposition, self.config.metrics_host, self.config.metrics_port)
                    self.metrics_server = await stack.enter_async_context(server)
                if self.config.dashboard_port is not None:
                    dashboard = DashboardServer(self._dashboard_state, self.config.metrics_host, self.config.dashboard_port)
                    self.dashboard_server = await stack.enter_async_context(dashboard)
                conn = await stack.enter_async_context(Connection(
                    self.config.broker,
                    self.config.mqtt_client_id,
                    subscriptions=self._subscriptions(),
                    persistent=True,
                    session_expiry=self.config.session_expiry,
                    on_connect=self._on_reconnect,
                    max_buffered=self._inbox_limit(),
                ))
                self.conn = conn
                stack.callback(self.ingest.close)  # no release timer, no receipt after the connection closes
                self.metrics.watch_published(lambda: conn.bytes_published)
                await self._start_ingest(stack)
                await self._serve()

    def _subscriptions(self) -> list[str]:
        return [self.topics.all_updates, self.topics.all_presence]

    def _inbox_limit(self) -> int | None:
        """Messages this connection holds before it stops reading (fedge_contract.mqtt backpressure):
        a flood of updates waits in the broker, not in our memory."""
        return self.config.inbox_limit

    async def _start_ingest(self, stack: contextlib.AsyncExitStack) -> None:
        """Start what ingests updates besides this connection (the sharded aggregator's workers)."""

    # ------------------------------------------------------------------ state
    def _resume(self, initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fingerprint = self.spec.fingerprint
        for key, value in (("fleet", self.config.fleet), ("fingerprint", fingerprint)):
            other = self.store.claim(key, value)
            if other is not None:
                raise StoreMismatch(
                    f"store {self.config.store} holds {key} {other!r}, not {value!r}: use another --store for this fleet/task"
                )
        self.epoch = self.store.take_over()
        checkpoint = self.store.latest_checkpoint()
        if checkpoint is None:
            self.store.save_initial(fingerprint, initial)
            log.info("initialised model v0 (%d parameters, fingerprint %s)", self.spec.num_parameters, fingerprint)
            return initial
        self._strategy.load_state(checkpoint.strategy_state)
        self.version = checkpoint.version
        log.info("resumed from checkpoint v%d in %s", self.version, self.config.store)
        return checkpoint.weights

    def _done(self) -> bool:
        return self.config.rounds > 0 and self.version >= self.config.rounds

    # ------------------------------------------------------------------ rounds
    async def _serve(self) -> None:
        while not self._done():
            rnd = self._open_round()
            await self._announce(rnd)
            await self._collect(rnd)
            await self._close(rnd)
        await self._publish_final()

    def _open_round(self) -> OpenRound:
        number = self.version + 1
        rnd = OpenRound(number=number, base_version=self.version, deadline=self.clock() + self.config.deadline, plan=self.config.plan)
        self.ingest.reset()
        self.store.open_round(number, self.version, rnd.deadline)
        for update in self.ingest.refold(self.store.spooled(number)):  # a restart mid-round: re-fold what was accepted
            rnd.record(update.client_id, update.update_id)
        if rnd.accepted:
            log.info("round %d: re-folded %d spooled updates", number, rnd.accepted)
        return rnd

    async def _collect(self, rnd: OpenRound) -> None:
        while not rnd.full:
            remaining = rnd.deadline - self.clock()
            if remaining <= 0:
                if rnd.at_deadline(self.clock()) is DeadlineAction.CLOSE:
                    log.info("round %d: deadline with %d/%d updates, closing", rnd.number, rnd.accepted, rnd.plan.target)
                    return
                log.warning("round %d: deadline with %d < min %d updates, extended", rnd.number, rnd.accepted, rnd.plan.min_updates)
                self.store.extend_round(rnd.number, rnd.deadline)
                await self._announce(rnd)
                continue
            try:
                async with asyncio.timeout(remaining):
                    event = await self._next_event()
            except TimeoutError:
                continue
            await self._handle_event(event, rnd)

    async def _next_event(self) -> Any:
        """What the round loop waits for: here a message; the sharded aggregator adds its workers' reports."""
        return await self.conn.messages.get()

    async def _handle_event(self, event: Any, rnd: OpenRound) -> None:
        await self._dispatch(event, rnd)

    def _on_presence(self, client: str, payload: bytes) -> None:
        try:
            presence = Presence.from_bytes(payload, fleet=self.config.fleet)
        except DecodeError as exc:
            if payload:  # an empty retained message clears presence: not an error
                log.warning("bad presence from %s: %s", client, exc)
            self.online.discard(client)
            self.devices.pop(client, None)
        else:
            (self.online.add if presence.state == "online" else self.online.discard)(client)
            self.devices[client] = presence
        self.metrics.online_agents(len(self.online))

    def _admission(self, rnd: Round) -> Admission:
        """Sync rounds admit through the store's ledger (as ingest workers do)."""
        assert isinstance(rnd, OpenRound)
        return LedgerAdmission(self.store, rnd.number, rnd.base_version, rnd.plan.target, epoch=self.epoch)

    async def _on_accepted(self, rnd: Round, update: Update) -> None:
        self._record(rnd, update)
        self._status_dirty = True

    async def _dispatch(self, message: aiomqtt.Message, rnd: Round) -> None:
        await super()._dispatch(message, rnd)
        self._status_if_due(rnd)

    def _idle(self) -> bool:
        """Nothing more is waiting to be handled right now (the end of a burst)."""
        return self.conn.messages.empty()

    def _status_if_due(self, rnd: Round | None) -> None:
        """RoundStatus once per burst of accepted updates, and at least every STATUS_INTERVAL under
        sustained load: one status per update would cost a publish per update."""
        if rnd is None or rnd is not self._announced:
            return  # closing (or not open yet): the close publishes the round's next state itself
        if self._status_dirty and (self._idle() or time.monotonic() - self._status_at >= STATUS_INTERVAL):
            self._status_dirty, self._status_at = False, time.monotonic()
            self.conn.publish_soon(self.topics.status, self._status(rnd, RoundState.OPEN).to_bytes(), retain=True)

    def _record(self, rnd: Round, update: Update) -> None:
        assert isinstance(rnd, OpenRound)
        rnd.record(update.client_id, update.update_id)

    def _round_metrics(self, rnd: Round) -> dict[str, float]:
        """Mode-specific metrics stored with the round (async: staleness)."""
        return {}

    def _count_receipt(self, status: ReceiptStatus, reason: str, nbytes: int) -> None:
        """Every update answered, here or by an ingest worker: the counters and Prometheus metrics."""
        self.counters["bytes_in"] += nbytes
        self.counters[status.value] += 1
        self.metrics.receipt(status.value, reason, nbytes)
        if status is not ReceiptStatus.ACCEPTED:
            self.counters[f"{status.value}:{reason.split(':', 1)[0]}"] += 1

    async def _gather(self, rnd: Round) -> Collector:
        """The round's complete sum, checked against the store's ledger (sharded: merged from the workers)."""
        self.ingest.check_ledger(rnd.number)
        return self.ingest.collector

    async def _close(self, rnd: Round) -> None:
        self._announced = None
        await self.ingest.drain()
        await self.conn.flush()  # receipts and throttled statuses go out before the round's state changes
        self._status_dirty = False
        await self._publish_status(rnd, RoundState.AGGREGATING)
        started = self.clock()
        total = await self._gather(rnd)
        new_weights = self._strategy.apply(self.weights, total.mean())
        self.store.close_round(rnd.number, self.version + 1, self.spec.fingerprint, new_weights, self._strategy.state(), rnd.accepted)
        self.weights, self.version = new_weights, self.version + 1
        metrics: dict[str, float] = {"round": float(rnd.number), "accepted": float(rnd.accepted), "samples": total.total_weight}
        metrics.update(self._round_metrics(rnd))
        metrics.update(self.defence.metrics(self.version))
        if self._eval_data is not None:
            metrics.update(await asyncio.to_thread(self._evaluate, self._eval_data))
        metrics["aggregate_seconds"] = self.clock() - started
        self.store.set_round_metrics(rnd.number, metrics)
        self.last_metrics = metrics
        self.metrics.round_closed(self.version, metrics)
        log.info("round %d closed: v%d from %d updates %s", rnd.number, self.version, rnd.accepted,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("accuracy", "loss")),
                 extra={"round": rnd.number, "version": self.version, "accepted": rnd.accepted})

    def _evaluate(self, data: Any) -> dict[str, float]:
        from fedge_tasks.loops import evaluate
        from fedge_tasks.weights import set_weights

        set_weights(self._model, self.weights)
        kwargs = {"loss_fn": self._loss} if self._loss else {}
        result = evaluate(self._model, data, **kwargs)
        return {"accuracy": result["accuracy"], "loss": result["loss"]}

    # ------------------------------------------------------------------ publishing
    def _global(self, rnd: Round | None) -> GlobalModel:
        return GlobalModel(
            fleet=self.config.fleet,
            model_version=self.version,
            round=rnd.number if rnd else self.version,
            deadline=rnd.deadline if rnd else None,
            task=self.training,
            fingerprint=self.spec.fingerprint,
            tensors=encode_weights(self.weights, self._global_chain),
            final=rnd is None,
        )

    async def _announce(self, rnd: Round) -> None:
        self._announced = rnd
        self.metrics.round_opened(rnd.number, self.version, rnd.accepted, rnd.plan.target)
        payload = self._global(rnd).to_bytes()
        self.counters["bytes_out_global"] += len(payload)
        await publish_global(self.conn, self.topics, self.version, payload, self.config.max_message_bytes)  # chunked if large
        await self._publish_status(rnd, RoundState.OPEN)
        deadline = f"deadline in {rnd.deadline - self.clock():.0f}s" if rnd.deadline is not None else "no deadline"
        log.info("round %d open on v%d: target %d, min %d, %s (%d bytes)",
                 rnd.number, self.version, rnd.plan.target, rnd.plan.min_updates, deadline, len(payload))

    async def _publish_status(self, rnd: Round | None, state: RoundState) -> None:
        await self.conn.publish(self.topics.status, self._status(rnd, state).to_bytes(), retain=True)

    def _status(self, rnd: Round | None, state: RoundState) -> RoundStatus:
        status = RoundStatus(
            fleet=self.config.fleet,
            round=rnd.number if rnd else self.version,
            model_version=self.version,
            state=state,
            accepted=rnd.accepted if rnd else 0,
            target=rnd.plan.target if rnd else self.config.target,
            min_updates=rnd.plan.min_updates if rnd else self.config.min_updates,
            deadline=rnd.deadline if rnd else None,
            rounds_total=self.config.rounds or None,
            last_metrics=self.last_metrics,
        )
        self.metrics.accepted(status.accepted)
        self.status = status
        return status

    def _dashboard_state(self) -> dict[str, Any]:
        return fleet_state(self.config.fleet, self.status, self.devices, self.store.rounds(), self.store.bytes_by_round(), self.clock())

    async def _publish_final(self) -> None:
        await publish_global(self.conn, self.topics, self.version, self._global(None).to_bytes(), self.config.max_message_bytes)
        await self._publish_status(None, RoundState.FINISHED)
        log.info("finished: model v%d after %d rounds", self.version, self.version)

    async def _on_reconnect(self) -> None:
        """Re-announce the open round after a reconnect (not on the first connect).

        A broker that crashed before its autosave lost our session, so updates published before
        we re-subscribed were dropped, and it may have lost the retained model too. The
        re-announcement restores the retained state, and agents treat it as "resend what has no
        receipt yet" (the aggregator dedupes by update id).
        """
        if self.conn.connections > 1 and self._announced is not None:
            log.info("reconnected: re-announcing round %d", self._announced.number)
            await self._announce(self._announced)

"""What the aggregator tells the fleet: the retained GlobalModel of each round and its RoundStatus.

A GlobalModel carries the round's cohort (``Round.invitation()``: who is invited to train) and the
eval threshold of its version (``ask_eval``), in its ``cohort`` field; without either, its bytes are
what they were before cohorts.

The GlobalModel is encoded off the loop (a large model costs a whole copy, and its codec more)
and published whole, or in chunks above ``max_message_bytes`` (ingest/chunked.py). RoundStatus
is published when a round changes state and, while updates are accepted, at most once per burst
and every ``STATUS_INTERVAL`` under sustained load: one status per update would cost a publish
per update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from aggregator.config import AggregatorConfig
from aggregator.ingest.chunked import publish_global
from aggregator.model import GlobalModel as ModelState
from aggregator.observability.metrics import AggregatorMetrics
from aggregator.rounds.policy import Round
from fedge_contract import GlobalModel, RoundState, RoundStatus, Topics
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.cohort import Participation
from fedge_contract.mqtt import Connection

log = logging.getLogger("fedge.aggregator")

AskEval = Callable[[int, bool], int | None]  # (version, final) -> the eval threshold its announcement carries, or None

STATUS_INTERVAL = 0.5  # seconds: RoundStatus at most this stale while updates keep coming


class Announcer:
    def __init__(self, config: AggregatorConfig, model: ModelState, conn: Connection, metrics: AggregatorMetrics,
                 clock: Callable[[], float], ask_eval: AskEval = lambda version, final: None) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        self.model = model
        self.conn = conn
        self.metrics = metrics
        self.clock = clock
        self.ask_eval = ask_eval  # the eval threshold an announcement of a version carries (observability/evaluations.py)
        self.chain = parse_chain(config.global_codec)
        self.status: RoundStatus | None = None  # the last status published (the dashboard's)
        self.last_metrics: Mapping[str, float] = {}  # the newest model's, in every status
        self.bytes_out = 0  # global model payloads published
        self._dirty = False  # accepted updates not yet in a published RoundStatus
        self._status_at = 0.0  # time.monotonic() of the last RoundStatus published for accepted updates

    async def announce(self, rnd: Round) -> None:
        """The round's model (retained), then its status: open."""
        self.metrics.round_opened(rnd.number, self.model.version, rnd.accepted, rnd.target)
        payload = await self._model_bytes(rnd)
        await publish_global(self.conn, self.topics, self.model.version, payload, self.config.ingest.max_message_bytes)
        await self.publish_status(rnd, RoundState.OPEN)
        deadline = f"deadline in {rnd.deadline - self.clock():.0f}s" if rnd.deadline is not None else "no deadline"
        log.info("round %d open on v%d: target %d, min %d, %s (%d bytes)",
                 rnd.number, self.model.version, rnd.target, rnd.min_updates, deadline, len(payload))

    async def final(self) -> None:
        """The final model (``final: true``, retained) and the finished status."""
        payload = await self._model_bytes(None)
        await publish_global(self.conn, self.topics, self.model.version, payload, self.config.ingest.max_message_bytes)
        await self.publish_status(None, RoundState.FINISHED)
        log.info("finished: model v%d after %d rounds", self.model.version, self.model.version)

    async def _model_bytes(self, rnd: Round | None) -> bytearray:
        model = self.model
        weights, version, training, fingerprint = model.weights, model.version, model.training, model.spec.fingerprint
        cohort = self._participation(rnd, version)

        def encode() -> bytearray:
            return GlobalModel(
                fleet=self.config.fleet, model_version=version, round=rnd.number if rnd else version,
                deadline=rnd.deadline if rnd else None, task=training, fingerprint=fingerprint,
                tensors=encode_weights(weights, self.chain), final=rnd is None, cohort=cohort,
            ).to_buffer()  # a piece at a time: a 100 MB model packed at once stalled the loop ~150 ms

        payload = await asyncio.to_thread(encode)
        self.bytes_out += len(payload)
        return payload

    def _participation(self, rnd: Round | None, version: int) -> Participation | None:
        """The announcement's ``cohort`` field: whom the round invites, whom the version asks to evaluate (None: neither)."""
        invited = rnd.invitation() if rnd is not None else None
        threshold = self.ask_eval(version, rnd is None)
        self.metrics.cohort(invited.count if invited is not None else 0)
        return None if invited is None and threshold is None else Participation(invited, threshold)

    def accepted(self) -> None:
        """An update was accepted: the status is due (``status_if_due``)."""
        self._dirty = True

    def status_if_due(self, rnd: Round | None, idle: bool) -> None:
        """RoundStatus once per burst of accepted updates (``idle``: the burst ended), and at least
        every STATUS_INTERVAL under sustained load. A round whose own protocol moved on (its count or
        note changed: a secure round's phase, an abandoned session) is due too."""
        if rnd is None or not (self._dirty or self._moved(rnd)):
            return
        if idle or time.monotonic() - self._status_at >= STATUS_INTERVAL:
            self._dirty, self._status_at = False, time.monotonic()
            self.conn.publish_soon(self.topics.status, self._status(rnd, RoundState.OPEN).to_bytes(), retain=True)

    def _moved(self, rnd: Round) -> bool:
        last = self.status
        return last is None or (rnd.number, rnd.accepted, rnd.target, rnd.note) != (last.round, last.accepted, last.target, last.note)

    async def publish_status(self, rnd: Round | None, state: RoundState) -> None:
        self._dirty = False
        await self.conn.publish(self.topics.status, self._status(rnd, state).to_bytes(), retain=True)

    def _status(self, rnd: Round | None, state: RoundState) -> RoundStatus:
        rounds = self.config.rounds
        status = RoundStatus(
            fleet=self.config.fleet,
            round=rnd.number if rnd else self.model.version,
            model_version=self.model.version,
            state=state,
            accepted=rnd.accepted if rnd else 0,
            target=rnd.target if rnd else rounds.target,
            min_updates=rnd.min_updates if rnd else rounds.min_updates,
            deadline=rnd.deadline if rnd else None,
            rounds_total=rounds.rounds or None,
            last_metrics=self.last_metrics,
            note=rnd.note if rnd else "",
        )
        self.metrics.accepted(status.accepted)
        self.status = status
        return status

"""An ingest worker: one of the N processes ``fedge aggregator --workers N`` starts.

Each worker has its own MQTT connection (persistent session, client id ``<aggregator>-w<i>``, so
a respawned worker drains what the broker queued for it) subscribed to the fleet's updates as a
shared subscription: the broker hands every update to one worker of the group. A worker runs
the aggregator's own ingest (``LocalIngest`` over ``aggregator.ingest.pipeline.Ingest``):
validate, admit in the shared store, spool, decode, fold into its partial sum, receipt. It never
imports torch (~40 MiB, not ~260), and its store runs on a thread of its own, as the coordinator's.

Control pipe (``fedge_contract.frames`` on stdin/stdout), coordinator -> worker:
  ``setup`` {index, epoch, config, spec, log} (first frame), ``open`` {round, base_version,
  target, deadline}, ``close`` {round}, ``stop``;
worker -> coordinator:
  ``ready`` (connected and subscribed), ``accepted`` {round, update_id, client, base_version},
  ``receipt`` {status, reason, nbytes} (the coordinator's counters and metrics), ``partial``
  {round, sum, update_ids, norms, clipped} (the answer to ``close``).
Updates are read only while a round is open: between ``close`` and the next ``open`` they wait
in the connection's queue, as they do in a single aggregator while it aggregates. End of file
on stdin (the coordinator exited or was killed) stops the worker after the update in hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import aiomqtt

from aggregator.aggregation.defence import Defence
from aggregator.config import AggregatorConfig
from aggregator.errors import Superseded
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.source import LocalIngest
from aggregator.ingest.validation import limits_for
from aggregator.rounds.sync import SyncRound
from aggregator.store import StoreThread
from fedge_contract import ReceiptStatus, Topics
from fedge_contract.aio import First, Second, cancel_and_wait, race
from fedge_contract.frames import pack_frame, read_frame
from fedge_contract.mqtt import Connection
from fedge_contract.tensors import ModelSpec, TensorSpec

log = logging.getLogger("fedge.aggregator.worker")

Frame = dict[str, Any] | None  # a control frame; None: the coordinator went away (end of file)


def share_group(fleet: str) -> str:
    """The shared-subscription group of a fleet's ingest workers."""
    return f"fedge-{fleet}"[:64]


def worker_client_id(config: AggregatorConfig, index: int) -> str:
    return f"{config.mqtt_client_id}-w{index}"


class Worker:
    def __init__(self, setup: dict[str, Any], control: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
        self.config = AggregatorConfig.from_wire(setup["config"])
        self.index = int(setup["index"])
        self.epoch = int(setup["epoch"])
        self.spec = ModelSpec(tuple(TensorSpec(str(n), tuple(int(d) for d in shape), str(dtype)) for n, shape, dtype in setup["spec"]))
        self.topics = Topics(self.config.fleet)
        self.log = logging.getLogger(f"fedge.aggregator.w{self.index}")
        self._control_stream = control
        self._out = out
        self._control: asyncio.Queue[Frame] = asyncio.Queue()
        self._control_arrived = asyncio.Event()
        self._held_frames: list[Frame] = []  # a control frame taken off the queue while a message won (handled first)
        self._held: list[aiomqtt.Message] = []  # a message taken off the queue while a control frame won
        self.round: SyncRound | None = None

    async def run(self) -> None:
        ingest_settings = self.config.ingest
        async with StoreThread(self.config.store, fsync=ingest_settings.durability == "disk") as db:
            ingest = Ingest(
                fleet=self.config.fleet, spec=self.spec, limits=limits_for(self.config, self.spec), defence=Defence(self.config),
                db=db, send=self._publish_soon, answered=self._answered, log=self.log, loop=asyncio.get_running_loop(),
            )
            self.source = LocalIngest(ingest, db, self.topics, inbox_limit=ingest_settings.inbox_limit,
                                      chunk_timeout=ingest_settings.chunk_timeout, shard=self.index)
            reader = asyncio.create_task(self._read_control(), name=f"worker-{self.index}-control")
            try:
                async with Connection(
                    self.config.broker, worker_client_id(self.config, self.index),
                    subscriptions=[self.topics.shared_updates(share_group(self.config.fleet))],
                    persistent=True, session_expiry=self.config.session_expiry, max_buffered=ingest_settings.inbox_limit,
                ) as conn, self._bound(conn):
                    self.conn = conn
                    if await self._until_connected():
                        self._send({"kind": "ready"})
                        self.log.info("worker %d ready (pid %d)", self.index, os.getpid())
                        await self._serve()
            finally:
                await cancel_and_wait([reader])

    def _bound(self, conn: Connection) -> LocalIngest:
        self.source.bind(conn, self.epoch)
        return self.source

    async def _read_control(self) -> None:
        while True:
            frame = await read_frame(self._control_stream)
            self._control.put_nowait(frame)
            self._control_arrived.set()
            if frame is None:
                return

    async def _until_connected(self) -> bool:
        """Wait for the broker (False: the coordinator said stop, or went away, first)."""
        outcome = await race(self.conn.connected.wait(), self._control_arrived.wait())
        return isinstance(outcome, First)

    async def _serve(self) -> None:
        while True:
            event = await self._next()
            if isinstance(event, aiomqtt.Message):
                assert self.round is not None
                outcome = await self.source.handle(event, self.round)
                for accepted in outcome.accepted:
                    self._send({"kind": "accepted", "round": self.round.number, "update_id": accepted.update_id,
                                "client": accepted.client_id, "base_version": accepted.base_version})
                continue
            kind = event.get("kind") if event else "stop"
            if event is not None and kind == "open":
                self.round = SyncRound.admitting(int(event["round"]), int(event["base_version"]), int(event["target"]))
            elif event is not None and kind == "close":
                await self._close(int(event["round"]))
            elif kind == "stop":
                self.log.info("worker %d stopping", self.index)
                return

    async def _next(self) -> Frame | aiomqtt.Message:
        """The next control frame (first) or, while a round is open, the next update."""
        if self._held_frames:
            return self._held_frames.pop(0)
        if not self._control.empty():
            return self._control.get_nowait()
        if self.round is None:
            return await self._control.get()
        if self._held:
            return self._held.pop()
        if not self.conn.messages.empty():
            return self.conn.messages.get_nowait()
        outcome = await race(self._control.get(), self.conn.messages.get(), spare=self._keep)
        return outcome.value

    def _keep(self, lost: First[Frame] | Second[aiomqtt.Message]) -> None:
        """A message that arrived in the same step as the control frame that won: handled next."""
        if isinstance(lost, Second):
            self._held.append(lost.value)
        else:
            self._held_frames.append(lost.value)

    async def _close(self, number: int) -> None:
        if self.round is None or self.round.number != number:
            self.log.warning("close of round %d, which this worker does not have open", number)
        ingest = self.source.ingest
        await ingest.drain()
        await self.conn.flush()  # every receipt is out before the coordinator publishes the next model
        partial = {"kind": "partial", "round": number, **ingest.partial()}
        self._send(partial)
        await self._out.drain()
        self.log.info("round %d: sent the partial sum of %d updates", number, len(partial["update_ids"]))
        self.round = None
        ingest.reset()

    def _publish_soon(self, topic: str, payload: bytes) -> None:
        self.conn.publish_soon(topic, payload)

    def _answered(self, status: ReceiptStatus, reason: str, nbytes: int) -> None:
        self._send({"kind": "receipt", "status": status.value, "reason": reason, "nbytes": nbytes})

    def _send(self, frame: dict[str, Any]) -> None:
        if not self._out.is_closing():
            self._out.write(pack_frame(frame))


async def _serve_pipes(stdin_fd: int, stdout_fd: int) -> int:
    loop = asyncio.get_running_loop()
    control = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), os.fdopen(stdin_fd, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(stdout_fd, "wb", buffering=0))
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    setup = await read_frame(control)
    if setup is None or setup.get("kind") != "setup":
        print("aggregator worker: no setup frame on stdin (it is started by `fedge aggregator --workers N`)", file=sys.stderr)
        return 2
    _setup_logging(setup.get("log") or {})
    try:
        await Worker(setup, control, out).run()
    except Superseded as exc:
        log.warning("worker %s stopping: %s", setup.get("index"), exc)
        return 3
    finally:
        transport.close()
    return 0


def _setup_logging(settings: dict[str, Any]) -> None:
    from fedge_runtime.logs import setup_logging

    setup_logging(str(settings.get("level") or "info"), settings.get("file"), json=bool(settings.get("json")))


def main() -> int:
    from fedge_runtime.allocator import keep_large_buffers

    keep_large_buffers()
    # Frames own the real stdout; anything else printed goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        return asyncio.run(_serve_pipes(0, out_fd))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""An ingest worker: one of the N processes ``fedge aggregator --workers N`` starts.

Each worker has its own MQTT connection (persistent session, client id ``<aggregator>-w<i>``, so
a respawned worker drains what the broker queued for it) subscribed to the fleet's updates as a
shared subscription: the broker hands every update to one worker of the group. A worker runs
the aggregator's own update path (``Endpoint._dispatch`` -> ``aggregator.ingest.Ingest``):
validate, admit in the shared store, spool, decode, fold into its partial sum, receipt. It never
imports torch (~40 MiB, not ~260).

Control pipe (``fedge_contract.frames`` on stdin/stdout), coordinator -> worker:
  ``setup`` {index, epoch, config, spec, log} (first frame), ``open`` {round, base_version,
  target, deadline}, ``close`` {round}, ``stop``;
worker -> coordinator:
  ``ready`` (connected and subscribed), ``accepted`` {round, update_id, client}, ``receipt``
  {status, reason, nbytes} (the coordinator's counters and metrics), ``partial`` {round, sum,
  update_ids, norms, clipped} (the answer to ``close``).
Updates are read only while a round is open: between ``close`` and the next ``open`` they wait
in the connection's queue, as they do in a single aggregator while it aggregates. End of file
on stdin (the coordinator exited or was killed) stops the worker after the update in hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import aiomqtt

from aggregator.config import AggregatorConfig
from aggregator.defence import Defence
from aggregator.errors import Superseded
from aggregator.ingest import Admission, Ingest, LedgerAdmission, limits_for
from aggregator.service import Endpoint
from aggregator.store import Store
from fedge_contract import ReceiptStatus, Topics, Update
from fedge_contract.aio import cancel_and_wait
from fedge_contract.frames import pack_frame, read_frame
from fedge_contract.mqtt import Connection
from fedge_contract.tensors import ModelSpec, TensorSpec

log = logging.getLogger("fedge.aggregator.worker")


def share_group(fleet: str) -> str:
    """The shared-subscription group of a fleet's ingest workers."""
    return f"fedge-{fleet}"[:64]


def worker_client_id(config: AggregatorConfig, index: int) -> str:
    return f"{config.mqtt_client_id}-w{index}"


@dataclass(frozen=True)
class ShardRound:
    """The round a worker admits into, as its coordinator announced it."""

    number: int
    base_version: int
    target: int


class Worker(Endpoint):
    def __init__(self, setup: dict[str, Any], control: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
        self.config = AggregatorConfig.from_wire(setup["config"])
        self.index = int(setup["index"])
        self.epoch = int(setup["epoch"])
        self.spec = ModelSpec(tuple(TensorSpec(str(n), tuple(int(d) for d in shape), str(dtype)) for n, shape, dtype in setup["spec"]))
        self.topics = Topics(self.config.fleet)
        self.log = logging.getLogger(f"fedge.aggregator.w{self.index}")
        self._control_stream = control
        self._out = out
        self._control: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._control_arrived = asyncio.Event()
        self._held: list[aiomqtt.Message] = []  # a message taken off the queue while a control frame won
        self.round: ShardRound | None = None

    async def run(self) -> None:
        with Store(self.config.store, fsync=self.config.durability == "disk") as store:
            self.store = store
            self.ingest = Ingest(
                fleet=self.config.fleet, spec=self.spec, limits=limits_for(self.config, self.spec), defence=Defence(self.config),
                store=store, send=self._publish_soon, answered=self._answered, log=self.log, loop=asyncio.get_running_loop(),
            )
            reader = asyncio.create_task(self._read_control(), name=f"worker-{self.index}-control")
            try:
                async with Connection(
                    self.config.broker, worker_client_id(self.config, self.index),
                    subscriptions=[self.topics.shared_updates(share_group(self.config.fleet))],
                    persistent=True, session_expiry=self.config.session_expiry, max_buffered=self.config.inbox_limit,
                ) as conn:
                    self.conn = conn
                    try:
                        if await self._until_connected():
                            self._send({"kind": "ready"})
                            self.log.info("worker %d ready (pid %d)", self.index, os.getpid())
                            await self._serve()
                    finally:
                        self.ingest.close()  # no release timer, no receipt after the connection closes
            finally:
                await cancel_and_wait([reader])

    async def _read_control(self) -> None:
        while True:
            frame = await read_frame(self._control_stream)
            self._control.put_nowait(frame)
            self._control_arrived.set()
            if frame is None:
                return

    async def _until_connected(self) -> bool:
        """Wait for the broker (False: the coordinator said stop, or went away, first)."""
        connected = asyncio.create_task(self.conn.connected.wait())
        stopped = asyncio.create_task(self._control_arrived.wait())
        try:
            await asyncio.wait({connected, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([t for t in (connected, stopped) if not t.done()])
        return connected.done() and not connected.cancelled()

    async def _serve(self) -> None:
        while True:
            event = await self._next()
            if isinstance(event, aiomqtt.Message):
                assert self.round is not None
                await self._dispatch(event, self.round)  # type: ignore[arg-type]
                continue
            kind = event.get("kind") if event else "stop"
            if kind == "open":
                self.round = ShardRound(int(event["round"]), int(event["base_version"]), int(event["target"]))  # type: ignore[index]
            elif kind == "close":
                await self._close(int(event["round"]))  # type: ignore[index]
            elif kind == "stop":
                self.log.info("worker %d stopping", self.index)
                return

    async def _next(self) -> dict[str, Any] | aiomqtt.Message | None:
        """The next control frame (first) or, while a round is open, the next update."""
        if not self._control.empty():
            return self._control.get_nowait()
        if self.round is None:
            return await self._control.get()
        if self._held:
            return self._held.pop()
        if not self.conn.messages.empty():
            return self.conn.messages.get_nowait()
        control = asyncio.create_task(self._control.get())
        message = asyncio.create_task(self.conn.messages.get())
        try:
            await asyncio.wait({control, message}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([t for t in (control, message) if not t.done()])
        got_message = message.done() and not message.cancelled()
        if control.done() and not control.cancelled():
            if got_message:
                self._held.append(message.result())
            return control.result()
        return message.result()

    async def _close(self, number: int) -> None:
        if self.round is None or self.round.number != number:
            self.log.warning("close of round %d, which this worker does not have open", number)
        await self.ingest.drain()
        await self.conn.flush()  # every receipt is out before the coordinator publishes the next model
        partial = {"kind": "partial", "round": number, **self.ingest.partial()}
        self._send(partial)
        await self._out.drain()
        self.log.info("round %d: sent the partial sum of %d updates", number, len(partial["update_ids"]))
        self.round = None
        self.ingest.reset()

    # ------------------------------------------------------------------ Endpoint
    def _admission(self, rnd: Any) -> Admission:
        return LedgerAdmission(self.store, rnd.number, rnd.base_version, rnd.target, shard=self.index, epoch=self.epoch)

    async def _on_accepted(self, rnd: Any, update: Update) -> None:
        self._send({"kind": "accepted", "round": rnd.number, "update_id": update.update_id, "client": update.client_id})

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

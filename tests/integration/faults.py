"""Building blocks for fault tests: real fedge processes, an MQTT observer, the ledger check.

The ledger check is the property every fault test proves: the update ids folded into each model
version (``Store.accepted_ids``) are exactly the ids that got an ``accepted`` receipt, no id was
accepted twice, and each version's sample count is the sum over exactly those updates.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from aggregator.store import Store
from edge_agent.outbox import Outbox
from fedge_contract import DecodeError, GlobalModel, Receipt, ReceiptStatus, RoundStatus, Topics, Update
from fedge_contract.broadcast import GlobalDelta, decode_announcement
from fedge_contract.mqtt import BrokerAddress, Subscriber
from tests.integration.fleet import DIGITS_5

_MAX = 2**31


class Observer(Subscriber):
    """A plain MQTT subscriber to a fleet's receipts, updates, status and global model.

    ``until(predicate)`` returns once the predicate holds after some message: tests wait on
    what crossed the broker, never on time.
    """

    def __init__(self, address: BrokerAddress, fleet: str) -> None:
        self.topics = Topics(fleet)
        self.receipts: list[Receipt] = []
        self.updates: dict[str, bytes] = {}  # update id -> payload as published (first copy)
        self.statuses: list[RoundStatus] = []
        self.globals: list[GlobalModel | GlobalDelta] = []  # every announcement (delta broadcasts: GlobalDelta)
        self.global_bytes: list[int] = []  # and its size
        self._changed = asyncio.Event()
        super().__init__(address, f"observer-{fleet}", [f"{self.topics.prefix}/#"])

    async def on_message(self, topic: str, payload: bytes) -> None:
        if "/receipts/" in topic:
            self.receipts.append(Receipt.from_bytes(payload))
        elif "/updates/" in topic:
            try:
                self.updates.setdefault(Update.from_bytes(payload, max_bytes=_MAX).update_id, payload)
            except DecodeError:
                pass
        elif topic == self.topics.status:
            self.statuses.append(RoundStatus.from_bytes(payload))
        elif topic == self.topics.global_model:
            self.globals.append(decode_announcement(payload, max_bytes=_MAX))
            self.global_bytes.append(len(payload))
        self._changed.set()

    async def until(self, predicate: Callable[[Observer], bool]) -> None:
        while not predicate(self):
            self._changed.clear()
            await self._changed.wait()

    def with_status(self, status: ReceiptStatus, client: str | None = None) -> list[Receipt]:
        return [r for r in self.receipts if r.status is status and (client is None or r.client_id == client)]

    def round_open(self, number: int) -> bool:
        return any(s.round == number and s.state.value == "open" for s in self.statuses)


def folded(store_path: Path) -> dict[int, set[str]]:
    """Update ids folded into each closed round's model version."""
    with Store(store_path) as store:
        return {r["round"]: set(store.accepted_ids(r["round"])) for r in store.rounds() if r["closed"] is not None}


def assert_ledger(store_path: Path, received: Iterable[Receipt], *, rounds: int, unreceipted_ok: Iterable[str] = ()) -> dict[int, set[str]]:
    """The ledger of a run, round by round; returns the folded ids.

    - the aggregator sent ``accepted`` once per update id, and only for ids folded in that round;
    - every id in ``received`` (what the agents or an observer got) with ``accepted`` was folded, in
      that round; a folded id they never saw accepted must be in ``unreceipted_ok`` (the aggregator
      died between spooling it and publishing its receipt, or the receipt was lost in a cut: the
      agent then got ``duplicate`` for it);
    - each version's sample count is the sum over exactly its ids (nothing counted twice).
    """
    by_round = folded(store_path)
    assert sorted(by_round) == list(range(1, rounds + 1)), f"rounds closed: {sorted(by_round)}"
    with Store(store_path) as store:
        sent = [r for r in store.receipts() if r["status"] == ReceiptStatus.ACCEPTED.value]
    sent_counts = collections.Counter(r["update_id"] for r in sent)
    assert all(n == 1 for n in sent_counts.values()), f"an update was accepted twice: {sent_counts}"
    got: dict[int, set[str]] = collections.defaultdict(set)
    for receipt in received:
        if receipt.status is ReceiptStatus.ACCEPTED:
            got[receipt.round].add(str(receipt.update_id))
    extra_ok = set(unreceipted_ok)
    for number, ids in by_round.items():
        sent_ids = {r["update_id"] for r in sent if r["round"] == number}
        assert sent_ids <= ids, f"round {number}: accepted receipts sent for ids not folded: {sent_ids - ids}"
        assert ids - sent_ids <= extra_ok, f"round {number}: folded without an accepted receipt sent: {ids - sent_ids}"
        assert got[number] <= ids, f"round {number}: accepted but not folded: {got[number] - ids}"
        assert ids - got[number] <= extra_ok, f"round {number}: folded without an accepted receipt: {ids - got[number]}"
    with sqlite3.connect(store_path) as db:
        for number, accepted_n, samples in _closed_rounds(db):
            rows = db.execute("SELECT update_id, num_samples FROM accepted WHERE round=?", (number,)).fetchall()
            assert accepted_n == len(rows) == len(by_round[number])
            assert samples == sum(r[1] for r in rows), f"round {number}: an update was counted twice or lost"
    return by_round


def _closed_rounds(db: sqlite3.Connection) -> list[tuple[int, int, float]]:
    import json

    rows = db.execute("SELECT round, accepted, metrics FROM rounds WHERE closed IS NOT NULL ORDER BY round").fetchall()
    return [(r[0], r[1], json.loads(r[2])["samples"]) for r in rows]


# ---------------------------------------------------------------------- real processes
def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


async def spawn(*args: str, log: Path) -> asyncio.subprocess.Process:
    """``python -m fedge ARGS`` with its log in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedge", *args, f"--log-file={log}", "--log-level=info",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=_env(),
    )


def task_flags(options: dict[str, str] = DIGITS_5) -> list[str]:
    return ["--task=digits", *(f"--task-opt={k}={v}" for k, v in options.items())]


async def spawn_aggregator(url: str, fleet: str, store: Path, log: Path, *flags: str) -> asyncio.subprocess.Process:
    return await spawn("aggregator", f"--broker={url}", f"--fleet={fleet}", f"--store={store}", "--no-eval", *task_flags(), *flags, log=log)


async def spawn_agent(url: str, fleet: str, client_id: str, state_root: Path, log: Path, *flags: str) -> asyncio.subprocess.Process:
    return await spawn(
        "agent", f"--broker={url}", f"--fleet={fleet}", f"--client-id={client_id}", f"--state-dir={state_root / client_id}",
        "--exit-when-final", "--policy=always", *task_flags(), *flags, log=log,
    )


async def sigkill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    await process.wait()


@asynccontextmanager
async def owned(*processes: asyncio.subprocess.Process) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Processes killed (if still running) when the block exits, however it exits."""
    running = list(processes)
    try:
        yield running
    finally:
        for process in running:
            if process.returncode is None:
                process.kill()
                await process.wait()


def outbox_ids(state_dir: Path) -> set[str]:
    """Ids in an agent's outbox, read as the agent reads them (update ids may contain '-')."""
    return {pending.update_id for pending in Outbox(state_dir / "outbox").pending()}

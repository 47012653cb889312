"""What became of every update the agents of a ``fedge simulate`` run trained (issue 19's ledger).

An update is trained once (its id is new) and must end one way, whatever faults struck:

- accepted: it is in the store's accepted ledger, in the round it was trained for, folded once;
- answered with a reason: no aggregator accepted it, and a ``stale`` or ``rejected`` receipt
  reached its device (the device logged it) and is in the store's receipts;
- dropped on purpose: no answer reached its device, which dropped it with a WARNING line and
  counted it (its ``state.json`` and its presence's ``dropped``).

Anything else is **silently lost**: trained, never accepted, and neither answered nor dropped (an
update still in an outbox when the run ended counts here too). **Double-counted**: an update
accepted twice (two ``accepted`` receipts recorded, two ledger rows) or a round whose sample
count exceeds the sum over the updates it lists.

The evidence is what the programs leave: the agents' JSON logs (``--log-json``; each ``trained``
line names its update), their ``state.json`` and outboxes, each device's presence as the broker
retained it at the end, what ``fedge status`` shows (report.json's ``dropped_by_device``), and
the store. The device-side counts must agree (WARNING lines = state.json = presence, per
device); a disagreement, or an accepted update no agent logged as trained (the logs would be
incomplete), is a problem.
"""

from __future__ import annotations

import collections
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ANSWERED = frozenset({"stale", "rejected"})


@dataclass
class Fates:
    trained: int = 0
    accepted: int = 0
    answered: int = 0  # with a reason (stale, rejected) that reached the device
    dropped: int = 0  # unanswered, dropped on purpose and counted by the device
    lost: int = 0  # silently: none of the above
    double_counted: int = 0
    accepted_but_dropped: int = 0  # accepted, yet no receipt reached the device, which dropped and counted it
    left_in_outbox: int = 0  # still waiting in an outbox when the run ended (counted in `lost`)
    answered_by: dict[str, int] = field(default_factory=dict)  # "status: reason" (numbers as N) -> updates
    dropped_why: dict[str, int] = field(default_factory=dict)  # the device's reason -> updates
    lost_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.double_counted == 0 and not self.problems


@dataclass
class _Device:
    trained: dict[str, int] = field(default_factory=dict)  # update id -> round
    receipts: dict[str, tuple[str, str]] = field(default_factory=dict)  # update id -> (status, reason) that reached it
    dropped: dict[str, str] = field(default_factory=dict)  # update id -> why


def _devices(logs: Path) -> dict[str, _Device]:
    """What each device said about its updates, from the agent hosts' JSON logs."""
    devices: dict[str, _Device] = collections.defaultdict(_Device)
    for path in sorted(logs.glob("agents*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            client, update, message = entry.get("client"), entry.get("update"), entry.get("message", "")
            if entry.get("logger") != "fedge.agent" or not client or not update:
                continue
            device = devices[client]
            if ": trained round " in message:
                device.trained[update] = int(entry["round"])
            elif "status" in entry:
                device.receipts[update] = (entry["status"], entry.get("reason", ""))
            elif ": dropped update " in message:
                device.dropped[update] = entry.get("reason", "")
    return devices


def _store(store: Path) -> tuple[dict[str, list[int]], dict[str, list[tuple[str, str]]], list[tuple[int, int, float]]]:
    """Accepted rounds per update id, receipts recorded per update id, and each closed round's (round, samples, sum)."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        accepted_rows = db.execute("SELECT update_id, round, num_samples FROM accepted").fetchall()
        receipt_rows = db.execute("SELECT update_id, status, reason FROM receipts WHERE update_id IS NOT NULL").fetchall()
        rounds = db.execute("SELECT round, metrics FROM rounds WHERE closed IS NOT NULL").fetchall()
    accepted: dict[str, list[int]] = collections.defaultdict(list)
    samples: collections.Counter[int] = collections.Counter()
    for update_id, number, num_samples in accepted_rows:
        accepted[update_id].append(number)
        samples[number] += num_samples
    receipts: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for update_id, status, reason in receipt_rows:
        receipts[update_id].append((status, reason))
    folded = [(number, samples[number], float(json.loads(metrics or "{}").get("samples", 0))) for number, metrics in rounds]
    return accepted, receipts, folded


def _device_counts(out: Path, devices: dict[str, _Device]) -> list[str]:
    """The device side must agree with itself: WARNING lines = state.json's count = the presence's, per device."""
    problems = []
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    presence: dict[str, int] = report.get("dropped_by_device", {})
    folders = {p.name for p in (out / "agents").iterdir() if p.is_dir()} if (out / "agents").is_dir() else set()
    for client in sorted(folders | set(devices) | set(presence)):
        state_file = out / "agents" / client / "state.json"
        state = json.loads(state_file.read_text()).get("dropped_updates", 0) if state_file.exists() else 0
        logged = len(devices[client].dropped) if client in devices else 0
        if not logged == state == presence.get(client, 0):
            problems.append(f"{client}: {logged} dropped updates logged, {state} in state.json, {presence.get(client, 0)} in its presence")
    return problems


def _left_in_outboxes(out: Path) -> set[str]:
    return {path.name.rsplit("-", 1)[1].removesuffix(".update") for path in (out / "agents").glob("*/outbox/*.update")}


def update_fates(out: Path, store: Path | None = None) -> Fates:
    """The fate of every update trained in the run folder ``out`` (its store: ``store`` or OUT/aggregator.sqlite)."""
    devices = _devices(out / "logs")
    accepted, receipts, folded = _store(store or out / "aggregator.sqlite")
    left = _left_in_outboxes(out)
    fates = Fates(problems=_device_counts(out, devices))
    answered_by: collections.Counter[str] = collections.Counter()
    dropped_why: collections.Counter[str] = collections.Counter()
    trained_ids: set[str] = set()
    for client, device in sorted(devices.items()):
        for update_id, number in device.trained.items():
            fates.trained += 1
            trained_ids.add(update_id)
            status, reason = device.receipts.get(update_id, ("", ""))
            if update_id in accepted:
                fates.accepted += 1
                if accepted[update_id] != [number]:
                    fates.problems.append(f"{client}: update {update_id} of round {number} accepted in round(s) {accepted[update_id]}")
                if update_id in device.dropped:
                    fates.accepted_but_dropped += 1
                if status in ANSWERED:
                    fates.problems.append(f"{client}: update {update_id} accepted, yet its device got {status}")
            elif status in ANSWERED:
                fates.answered += 1
                answered_by[f"{status}: {re.sub(r'[0-9]+', 'N', reason)}"] += 1
                if (status, reason) not in receipts.get(update_id, []):
                    fates.problems.append(f"{client}: update {update_id} answered {status} ({reason}), a receipt the store never recorded")
            elif update_id in device.dropped:
                fates.dropped += 1
                dropped_why[device.dropped[update_id]] += 1
            else:
                fates.lost += 1
                fates.lost_ids.append(f"{client}/{update_id}/r{number}" + (" (left in its outbox)" if update_id in left else ""))
                if status:
                    fates.problems.append(f"{client}: update {update_id} got {status} but the store did not accept it")
            if update_id in left:
                fates.left_in_outbox += 1
    unknown = set(accepted) - trained_ids
    if unknown:
        fates.problems.append(f"{len(unknown)} accepted updates no agent logged as trained (are the agents' logs JSON and complete?)")
    twice = {u for u, rows in receipts.items() if sum(s == "accepted" for s, _ in rows) > 1} | {u for u, r in accepted.items() if len(r) > 1}
    over = [number for number, listed, counted in folded if counted > listed + 1e-6]
    fates.double_counted = len(twice) + len(over)
    if over:
        fates.problems.append(f"rounds {over}: more samples folded than their accepted updates hold")
    fates.answered_by, fates.dropped_why = dict(answered_by), dict(dropped_why)
    return fates


def as_dict(fates: Fates) -> dict[str, Any]:
    data = {k: v for k, v in vars(fates).items()}
    data["ok"] = fates.ok
    return data

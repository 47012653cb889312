"""``fedge report RUN_DIR``: a finished (or running) run, read from its aggregator store, as PNGs and HTML.

Everything comes from the store (``Store.rounds()`` and ``Store.receipts()``), so the report works
for any aggregator, not only simulations: accuracy and loss per model version, updates folded per
round, every receipt by status, and bytes per device per round: up (the mean update received) next
to down (what each device downloaded for the round's announcements, ``rounds.bytes_down``).
``report.html`` embeds the PNGs, so the one file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import collections
import html
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.store import Store
from fedge.errors import CommandError

STATUSES = ("accepted", "duplicate", "stale", "rejected")
STORE_NAME = "aggregator.sqlite"


class ReportError(CommandError):
    """The folder holds no aggregator store (the CLI prints it without a traceback)."""


@dataclass
class RunData:
    store: Path
    rounds: list[dict[str, Any]]
    receipts: dict[int, collections.Counter[str]] = field(default_factory=dict)  # round -> status -> count
    bytes_received: dict[int, int] = field(default_factory=dict)  # round -> update bytes received
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)  # "status: reason code" -> count

    def metric(self, name: str) -> list[float]:
        return [float(r["metrics"].get(name, math.nan)) for r in self.rounds]

    def up_per_device(self, round_no: int) -> float:
        """The mean update received in ``round_no`` (bytes), NaN when none was."""
        count = sum(self.receipts.get(round_no, collections.Counter()).values())
        return self.bytes_received.get(round_no, 0) / count if count else math.nan


def find_store(path: Path) -> Path:
    """``path`` itself if it is a store file, else the folder's ``aggregator.sqlite`` or its only ``*.sqlite``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ReportError(f"{path} does not exist")
    if (path / STORE_NAME).is_file():
        return path / STORE_NAME
    candidates = sorted(path.glob("*.sqlite"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(c.name for c in candidates) or "none"
    raise ReportError(f"{path}: expected {STORE_NAME} or a single *.sqlite store (found: {found})")


def load_run(path: Path) -> RunData:
    store_path = find_store(path)
    try:
        with Store(store_path, readonly=True) as store:
            run = RunData(store_path, store.rounds())
            receipts = store.receipts()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{store_path} is not a readable aggregator store ({exc})") from None
    for receipt in receipts:
        run.receipts.setdefault(receipt["round"], collections.Counter())[receipt["status"]] += 1
        run.bytes_received[receipt["round"]] = run.bytes_received.get(receipt["round"], 0) + (receipt["bytes"] or 0)
        if receipt["status"] != "accepted":
            run.reasons[f"{receipt['status']}: {receipt['reason'].split(':', 1)[0] or '-'}"] += 1
    return run


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (shared with the simulation report)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: RunData, out: Path) -> dict[str, Path]:
    """One PNG per view of the run: accuracy, loss, participants, receipts. Returns title -> path."""
    plt = pyplot()
    numbers = [r["round"] for r in run.rounds]
    made: dict[str, Path] = {}

    def save(name: str, title: str, fig: Any) -> None:
        from matplotlib.ticker import MaxNLocator

        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        fig.tight_layout()
        path = out / f"report-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made[title] = path

    for name, ylabel in (("accuracy", "held-out accuracy"), ("loss", "held-out loss")):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot(numbers, run.metric(name), marker="o", markersize=3, label="server (held-out data)")
        federated = run.metric(f"fed_{name}")  # the devices' own held-out data (federated evaluation, issue 15)
        if any(math.isfinite(v) for v in federated):
            ax.plot(numbers, federated, marker="s", markersize=3, label="federated (devices' data)")
            ax.legend()
        ax.set(xlabel="round", ylabel=ylabel)
        ax.grid(alpha=0.3)
        save(name, ylabel, fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(numbers, [r["accepted"] for r in run.rounds], width=0.6)
    ax.set(xlabel="round", ylabel="updates folded")
    ax.grid(alpha=0.3, axis="y")
    save("participants", "participants per round", fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    receipt_rounds = sorted(set(numbers) | set(run.receipts))
    bottom = [0] * len(receipt_rounds)
    for status in STATUSES:
        counts = [run.receipts.get(n, collections.Counter())[status] for n in receipt_rounds]
        if any(counts):
            ax.bar(receipt_rounds, counts, bottom=bottom, width=0.6, label=status)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set(xlabel="round", ylabel="receipts")
    if any(bottom):
        ax.legend()
    ax.grid(alpha=0.3, axis="y")
    save("receipts", "receipts by status per round", fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar([n - 0.2 for n in numbers], [run.up_per_device(n) for n in numbers], width=0.4, label="up (mean update)")
    ax.bar([n + 0.2 for n in numbers], [r.get("bytes_down", 0) for r in run.rounds], width=0.4, label="down (announcements)")
    ax.set(xlabel="round", ylabel="bytes per device")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    save("bytes", "bytes per device per round", fig)
    return made


def _cell(value: Any, fmt: str = "{}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "<td>-</td>"
    return f"<td>{html.escape(fmt.format(value))}</td>"


def render_html(run: RunData, plots: dict[str, Path]) -> str:
    rows = []
    for r in run.rounds:
        seconds = r["closed"] - r["opened"] if r["closed"] is not None else None
        counts = run.receipts.get(r["round"], collections.Counter())
        rows.append(
            "<tr>" + _cell(r["round"]) + _cell(r["base_version"]) + _cell(r["accepted"]) + _cell(r["extensions"])
            + _cell(seconds, "{:.2f}") + _cell(r["metrics"].get("accuracy"), "{:.4f}") + _cell(r["metrics"].get("loss"), "{:.4f}")
            + _cell(r["metrics"].get("fed_accuracy"), "{:.4f}") + _cell(r["metrics"].get("fed_devices"), "{:.0f}")
            + _cell(r["metrics"].get("invited"), "{:.0f}")
            + "".join(_cell(counts[s]) for s in STATUSES) + _cell(run.bytes_received.get(r["round"], 0), "{:,}")
            + _cell(run.up_per_device(r["round"]), "{:,.0f}") + _cell(r.get("bytes_down", 0), "{:,}") + "</tr>"
        )
    headers = ["round", "base version", "folded", "extensions", "seconds", "accuracy", "loss", "federated accuracy", "evaluated by",
               "invited", *STATUSES, "bytes received", "up per device", "down per device"]
    images = "\n".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, path in plots.items()
    )
    reasons = "".join(f"<li>{html.escape(k)}: {v}</li>" for k, v in run.reasons.most_common()) or "<li>none</li>"
    final = run.rounds[-1]["metrics"].get("accuracy") if run.rounds else None
    summary = f"{len(run.rounds)} rounds" + (f", final accuracy {final:.4f}" if isinstance(final, float) else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedge run report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head>
<body><h1>fedge run report</h1>
<p>{html.escape(str(run.store))}: {html.escape(summary)}</p>
{images}
<h2>Updates not accepted, by reason</h2><ul>{reasons}</ul>
<h2>Rounds</h2>
<table><thead><tr>{"".join(f"<th>{h}</th>" for h in headers)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the PNGs and ``report.html`` into ``out`` (default: the run folder); returns the HTML's path."""
    run = load_run(run_dir)
    out = out or (run_dir if run_dir.is_dir() else run_dir.parent)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "report.html"
    page.write_text(render_html(run, plot_run(run, out)))
    return page

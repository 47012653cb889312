"""The simulation report: a table on the terminal, report.json and a PNG plot in the run folder."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedge_contract import TaskConfig


@dataclass(frozen=True)
class RoundRow:
    round: int
    accuracy: float
    loss: float
    participants: int  # updates folded into this round's model
    bytes_up: int  # update payloads published by agents for this round (resends included)
    bytes_down: int  # announcements (GlobalModel or GlobalDelta, chunks included) for this round x agents subscribed
    updates_published: int
    seconds: float  # from the round's opening to the next round's (or the end)
    selection_bytes: int = 0  # the announcement's cohort field (fedge_contract/cohort.py), per announcement
    trained: int | None = None  # synthetic: devices that made an update for this round (None: not counted)
    evals: int | None = None  # synthetic: evaluation reports sent for this round's model
    train_seconds: float | None = None  # devices' training seconds in the updates published for this round
    # delta broadcasts: catch-up material the aggregator put on retained topics this round (keyframes,
    # retained deltas, the task); stored once on the broker, downloaded only by devices that catch up
    bytes_retained: int = 0
    invited: int | None = None  # the round's cohort (None: every device was invited)
    fed_accuracy: float | None = None  # federated evaluation of this round's model on the devices' own data (--eval-every)
    fed_devices: int | None = None

    @property
    def updates_per_s(self) -> float:
        """Updates folded per second of the round (the aggregator's throughput under synthetic load)."""
        return self.participants / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class SimulationReport:
    options: dict[str, Any]
    rounds: list[RoundRow]
    wall_seconds: float
    peak_rss_mib: dict[str, float]  # per process; their sum bounds the combined peak from above
    final_global_bytes: int = 0
    unattributed_bytes: int = 0
    hosts: dict[str, Any] = field(default_factory=dict)  # synthetic load: each host's receipts, connect time and RSS
    dropped_by_device: dict[str, int] = field(default_factory=dict)  # `dropped` in each device's retained presence at the end (issue 19)
    # trained agents: what each device counted itself when it exited (agent_host.device_ledger): bytes up and
    # down, and under delta broadcasts what it fetched to catch up (only devices know that)
    devices: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seconds = [r.seconds for r in self.rounds if math.isfinite(r.seconds)]
        self.totals.update(
            seconds_per_round=sum(seconds) / len(seconds) if seconds else float("nan"),
            # round 1 also waits for the fleet to connect: the steady state is the rounds after it
            seconds_per_round_after_first=sum(seconds[1:]) / len(seconds[1:]) if len(seconds) > 1 else float("nan"),
            updates_per_s=sum(r.participants for r in self.rounds if math.isfinite(r.seconds)) / sum(seconds) if sum(seconds) > 0 else float("nan"),
        )
        self.totals.update(
            final_accuracy=self.rounds[-1].accuracy if self.rounds else float("nan"),
            bytes_up=sum(r.bytes_up for r in self.rounds),
            bytes_down=sum(r.bytes_down for r in self.rounds),
            bytes_retained=sum(r.bytes_retained for r in self.rounds),
            # each device's catch-up bytes summed (keyframes, retained deltas, the task), from the devices' own counts
            catch_up_bytes=sum(d["catch_up_bytes"] for d in self.devices.values()) if self.devices else float("nan"),
            devices_caught_up=sum(1 for d in self.devices.values() if d["caught_up"]) if self.devices else float("nan"),
            peak_rss_mib_sum=sum(self.peak_rss_mib.values()),
            wall_seconds=self.wall_seconds,
        )


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(report: SimulationReport, out: Path, console: Console) -> None:
    data = asdict(report)
    data["rounds"] = [{**{k: _finite(v) for k, v in row.items()}, "updates_per_s": _finite(r.updates_per_s)}
                      for row, r in zip(data["rounds"], report.rounds, strict=True)]
    data["totals"] = {k: _finite(v) for k, v in data["totals"].items()}
    (out / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False, default=str))
    _plot(report, out / "report.png")
    table = Table(title=f"fedge simulate: {report.options['agents']} agents, {len(report.rounds)} rounds")
    cohorts = any(r.invited is not None for r in report.rounds)
    federated = any(r.fed_accuracy is not None for r in report.rounds)
    for column in ("round", "accuracy", "loss", "participants", *(["invited"] if cohorts else []), *(["fed accuracy"] if federated else []),
                   "bytes up", "bytes down", "seconds", "updates/s"):
        table.add_column(column, justify="right")
    for row in report.rounds:
        extra = ([str(row.invited) if row.invited is not None else "all"] if cohorts else []) + (
            [f"{row.fed_accuracy:.4f}" if row.fed_accuracy is not None else "-"] if federated else [])
        table.add_row(str(row.round), f"{row.accuracy:.4f}", f"{row.loss:.4f}", str(row.participants), *extra,
                      f"{row.bytes_up:,}", f"{row.bytes_down:,}", f"{row.seconds:.2f}", f"{row.updates_per_s:.1f}")
    console.print(table)
    t = report.totals
    quality = f"final accuracy [bold]{t['final_accuracy']:.4f}[/]" if math.isfinite(t["final_accuracy"]) else "no evaluation"
    caught_up = t["catch_up_bytes"]
    catch_up = f" (+{caught_up:,} B to catch up, {t['devices_caught_up']} devices)" if math.isfinite(caught_up) and caught_up else ""
    console.print(
        f"{quality}; {t['seconds_per_round']:.2f} s per round, {t['updates_per_s']:.1f} updates/s; "
        f"uploaded {t['bytes_up']:,} B, downloaded {t['bytes_down']:,} B{catch_up}; "
        f"wall {t['wall_seconds']:.1f} s; peak memory {t['peak_rss_mib_sum']:.0f} MiB over {len(report.peak_rss_mib)} processes"
    )
    console.print(f"report: {out / 'report.json'}, {out / 'report.png'}")


def _plot(report: SimulationReport, path: Path) -> None:
    from fedge.report import pyplot

    plt = pyplot()
    rounds = [r.round for r in report.rounds]
    fig, (acc_ax, bytes_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if any(math.isfinite(r.accuracy) or r.fed_accuracy is not None for r in report.rounds):
        acc_ax.plot(rounds, [r.accuracy for r in report.rounds], marker="o", markersize=3, label="server")
        if any(r.fed_accuracy is not None for r in report.rounds):
            acc_ax.plot(rounds, [r.fed_accuracy if r.fed_accuracy is not None else math.nan for r in report.rounds], marker="s",
                        markersize=3, label="federated")
            acc_ax.legend()
        acc_ax.set_ylabel("test accuracy")
    else:  # synthetic load: nothing to evaluate, show the round times instead
        acc_ax.plot(rounds, [r.seconds for r in report.rounds], marker="o", markersize=3)
        acc_ax.set_ylabel("seconds per round")
    acc_ax.grid(alpha=0.3)
    codec = report.options["training"].get("codec") or TaskConfig().codec  # the contract's default when not set
    acc_ax.set_title(f"{report.options['agents']} agents, alpha {report.options['alpha']}, codec {codec}")
    bytes_ax.bar([r - 0.2 for r in rounds], [r.bytes_up / 1024 for r in report.rounds], width=0.4, label="up (updates)")
    bytes_ax.bar([r + 0.2 for r in rounds], [r.bytes_down / 1024 for r in report.rounds], width=0.4, label="down (announcements)")
    bytes_ax.set_ylabel("KiB per round")
    bytes_ax.set_xlabel("round")
    bytes_ax.legend()
    bytes_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

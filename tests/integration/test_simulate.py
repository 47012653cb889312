"""``fedge simulate`` as a user runs it: real processes, a real broker, a report on disk."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from aggregator.store import Store
from tests.integration.fleet import run_fedge

pytestmark = pytest.mark.integration


def simulate(out: Path, *flags: str) -> dict:
    done = run_fedge("simulate", f"--out={out}", "--quiet", *flags, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final accuracy" in done.stdout
    return json.loads((out / "report.json").read_text())


def test_report_counts_the_bytes_that_were_published_and_reruns_reproduce(tmp_path):
    flags = ("--agents=4", "--rounds=3", "--seed=3", "--alpha=1.0")
    first = simulate(tmp_path / "a", *flags)
    second = simulate(tmp_path / "b", *flags)

    rows = first["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["participants"] == 4 and r["updates_published"] == 4 for r in rows)
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in second["rounds"]]
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in second["rounds"]]
    assert (tmp_path / "a" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the wire tap's bytes up equal the payload sizes the aggregator received, update by update
    received: dict[int, int] = defaultdict(int)
    with Store(tmp_path / "a" / "aggregator.sqlite") as store:
        for receipt in store.receipts():
            received[receipt["round"]] += receipt["bytes"]
    assert [r["bytes_up"] for r in rows] == [received[r["round"]] for r in rows]
    # bytes down: one announcement per agent per round, under delta broadcasts (the default) version 0 as a
    # hold (~240 bytes in the compact form: the devices build it) and each later version as a delta, not the 38.9 KB model
    down = [row["bytes_down"] // 4 for row in rows]
    assert all(row["bytes_down"] % 4 == 0 for row in rows) and 150 < down[0] < 450 and all(250 < d < 1_500 for d in down[1:])
    assert first["totals"]["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert rows[0]["bytes_retained"] > 30_000  # v0's keyframe, stored once on the broker for devices that catch up
    # what each device counted itself agrees: every announcement once (the final one too), nothing to catch up
    devices = first["devices"]
    assert sorted(devices) == [f"agent-{i}" for i in range(4)]
    for counted in devices.values():
        assert counted["bytes_down"] == sum(down) + first["final_global_bytes"] // 4
        assert counted["catch_up_bytes"] == 0
    assert sum(d["bytes_up"] for d in devices.values()) == first["totals"]["bytes_up"] and first["totals"]["catch_up_bytes"] == 0


def test_default_simulation_meets_the_acceptance_bar(tmp_path):
    """20 agents x 30 rounds with the defaults: >= 0.93 accuracy, all processes under 1 GiB.
    (Its wall time is measured by bench/simulate_acceptance.py, not asserted here.)"""
    report = simulate(tmp_path / "run", "--agents=20", "--rounds=30")
    assert len(report["rounds"]) == 30
    assert all(r["participants"] == 20 for r in report["rounds"])
    assert report["totals"]["final_accuracy"] >= 0.93
    assert set(report["peak_rss_mib"]) == {"orchestrator", "aggregator", "agents-0", "mosquitto"}
    assert report["totals"]["peak_rss_mib_sum"] < 1024


def test_simulate_passes_secure_aggregation_on_and_counts_its_traffic(tmp_path):
    report = simulate(tmp_path / "s", "--agents=4", "--rounds=2", "--seed=3", "--alpha=1.0", "--secure-aggregation", "--secagg-unmask-timeout=5")
    rows = report["rounds"]
    assert [r["participants"] for r in rows] == [4, 4] and all(r["updates_published"] == 0 for r in rows)  # no Update in the clear
    for row in rows:  # each device's masked input is the float32 model's size plus the weight (4 x 9,611 bytes) and more
        assert row["bytes_up"] > 4 * 4 * 9_611
    assert rows[-1]["accuracy"] > 0.5
    with Store(tmp_path / "s" / "aggregator.sqlite") as store:
        assert [r["metrics"]["secure_summed"] for r in store.rounds()] == [4, 4]
        assert [len(store.secure_sessions(r)) for r in (1, 2)] == [1, 1]

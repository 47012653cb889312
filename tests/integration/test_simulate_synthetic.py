"""``fedge simulate --synthetic``: load from synthetic agents through the real CLI, broker and aggregator."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from aggregator.store import Store
from tests.integration.fleet import run_fedge

pytestmark = pytest.mark.integration


def simulate(out: Path, *flags: str) -> dict:
    done = run_fedge("simulate", "--synthetic", f"--out={out}", "--quiet", *flags, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "updates/s" in done.stdout
    return json.loads((out / "report.json").read_text())


def receipts_by_round(out: Path) -> tuple[dict[int, Counter[str]], dict[int, int], dict[int, int]]:
    """Per round: receipt statuses, bytes of all receipts, bytes of the accepted ones (the aggregator's own record)."""
    statuses: dict[int, Counter[str]] = defaultdict(Counter)
    received: dict[int, int] = defaultdict(int)
    accepted: dict[int, int] = defaultdict(int)
    with Store(out / "aggregator.sqlite", readonly=True) as store:
        for receipt in store.receipts():
            statuses[receipt["round"]][receipt["status"]] += 1
            received[receipt["round"]] += receipt["bytes"]
            if receipt["status"] == "accepted":
                accepted[receipt["round"]] += receipt["bytes"]
    return statuses, received, accepted


def test_fifty_agents_in_two_hosts_fill_every_round_to_its_target_with_the_aggregators_codec(tmp_path):
    out = tmp_path / "run"
    report = simulate(out, "--agents=50", "--rounds=3", "--target=40", "--params=10000", "--codec=q8+zstd", "--hosts=2")

    rows = report["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["participants"] == 40 for r in rows)
    assert all(r["seconds"] > 0 and r["updates_per_s"] > 0 for r in rows)
    ledgers = [json.loads(p.read_text()) for p in sorted((out / "agents").glob("*.json"))]
    assert len(ledgers) == 2 and sum(ledger["agents"] for ledger in ledgers) == 50
    statuses, _, accepted_bytes = receipts_by_round(out)
    for row in rows:
        mine = [ledger["rounds"][str(row["round"])] for ledger in ledgers]
        # the hosts' own count of what they published is the report's, and every agent answered each round once
        assert row["bytes_up"] == sum(m["bytes"] for m in mine) and row["updates_published"] == sum(m["updates"] for m in mine) == 50
        # what the agents saw accepted is, byte for byte, what the aggregator accepted
        assert sum(m["accepted"] for m in mine) == statuses[row["round"]]["accepted"] == 40
        assert sum(m["accepted_bytes"] for m in mine) == accepted_bytes[row["round"]]
        # q8 on the wire (1 byte per parameter plus scales and framing), not float32's 40 kB
        assert 10_000 < accepted_bytes[row["round"]] / 40 < 14_000
    assert report["totals"]["bytes_down"] == sum(r["bytes_down"] for r in rows)
    assert all(r["bytes_down"] > 2 * 40_000 for r in rows)  # one f32 global model per host (downloads=host)
    assert report["totals"]["final_accuracy"] is None  # nothing to evaluate


def test_every_agent_downloading_costs_agents_times_the_model_and_bytes_up_match_the_aggregators_receipts(tmp_path):
    out = tmp_path / "run"
    report = simulate(out, "--agents=10", "--rounds=2", "--params=10000", "--codec=none", "--downloads=all")

    _, received, _ = receipts_by_round(out)
    rows = report["rounds"]
    assert [r["participants"] for r in rows] == [10, 10]
    assert [r["bytes_up"] for r in rows] == [received[1], received[2]]  # target = agents: every update lands in its round
    assert all(40_000 < r["bytes_up"] / 10 < 41_000 for r in rows)  # raw float32 deltas
    assert all(r["bytes_down"] % 10 == 0 and 40_000 < r["bytes_down"] / 10 < 41_000 for r in rows)

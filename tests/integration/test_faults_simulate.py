"""``fedge simulate`` with every fault flag at once, as a user runs it: the run completes and the
store's ledger holds (each accepted update folded once, in its round)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aggregator.store import Store
from tests.integration.faults import assert_ledger

pytestmark = pytest.mark.integration


def test_simulate_with_a_flaky_network_dropouts_and_real_kills_completes(tmp_path):
    out = tmp_path / "run"
    flags = [
        "--agents=6", "--rounds=4", "--agent-procs=2", "--target=6", "--min=3", "--deadline=3", "--seed=1",
        "--emulated-train-seconds=0.2", "--stragglers=0.17", "--slowdown=5",
        "--network=lan", "--reset-prob=0.05", "--dropout=0.34", "--dropout-return=1", "--late-joiners=0.17", "--late-join-round=2",
        "--kill-aggregator-at=2", "--restart-broker-at=3",
    ]
    done = subprocess.run([sys.executable, "-m", "fedge", "simulate", f"--out={out}", "--quiet", *flags],
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    chaos = json.loads((out / "chaos.json").read_text())
    assert [e["event"] for e in chaos["events"]] == ["late_joiners", "kill_aggregator", "restart_broker"]
    assert len(chaos["dropouts"]) == 2 and len(chaos["late_joiners"]) == 1
    assert set(chaos["links"]) == {f"agent-{i}" for i in range(6)}
    with Store(out / "aggregator.sqlite") as store:
        folded_ids = {(r, i) for r in range(1, 5) for i in store.accepted_ids(r)}
        receipted = {(r["round"], r["update_id"]) for r in store.receipts() if r["status"] == "accepted"}
    # Only updates of the round in which the aggregator was SIGKILLed (2) may be folded without an
    # accepted receipt: receipts wait for the batch's fsync (group commit), so the batch in hand when
    # it died was spooled but never answered; a resend of any of them gets "duplicate".
    unreceipted = folded_ids - receipted
    assert all(r == 2 for r, _ in unreceipted), unreceipted
    assert_ledger(out / "aggregator.sqlite", [], rounds=4, unreceipted_ok={i for _, i in folded_ids})
    assert (out / "logs" / "aggregator-2.log").exists()  # the restarted aggregator finished the run

"""``fedge simulate`` with every fault flag at once, as a user runs it: the run completes, the
store's ledger holds (each accepted update folded once, in its round) and every update an agent
trained is accepted, answered with a reason or dropped on purpose and counted (fedge/simulate/fates.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aggregator.store import Store
from fedge.failures import EXIT_STORAGE
from fedge.simulate.disk_full import MountError, small_tmpfs
from fedge.simulate.fates import update_fates
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
    done = subprocess.run([sys.executable, "-m", "fedge", "simulate", f"--out={out}", "--quiet", "--log-json", *flags],
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    chaos = json.loads((out / "chaos.json").read_text())
    assert [e["event"] for e in chaos["events"]] == ["late_joiners", "kill_aggregator", "restart_broker"]
    fates = update_fates(out)
    assert fates.ok and fates.trained >= 4 * 4, fates
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


def test_simulate_with_the_double_fault_and_a_store_that_fills_up_loses_no_update(tmp_path):
    """Issue 19's faults: the aggregator SIGKILLed and Mosquitto within a second after it (round 1),
    then the store's disk full mid-round (round 2): the aggregator exits with code 74 and one line,
    is restarted once the space is freed, and finishes the rounds; nothing trained is lost."""
    out = tmp_path / "run"
    try:
        with small_tmpfs(tmp_path / "disk", 8) as disk:
            store = disk / "agg.sqlite"
            # half the agents 5x slower: the faults strike once a round has its first updates, before it closes
            flags = ["--agents=4", "--rounds=4", "--agent-procs=1", "--target=4", "--min=2", "--deadline=3", "--seed=2",
                     "--emulated-train-seconds=0.3", "--stragglers=0.5", "--slowdown=5", "--double-fault-at=1", "--fill-store-at=2"]
            done = subprocess.run([sys.executable, "-m", "fedge", "simulate", f"--out={out}", f"--store={store}", "--quiet", "--log-json",
                                   *flags], capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stdout + done.stderr
            fates = update_fates(out, store)
            with Store(store) as opened:
                folded_ids = {i for r in range(1, 5) for i in opened.accepted_ids(r)}
            assert_ledger(store, [], rounds=4, unreceipted_ok=folded_ids)
    except MountError as exc:
        pytest.skip(f"needs root (or unshare -Urm) to mount the small filesystem it fills: {exc}")
    double, full = json.loads((out / "chaos.json").read_text())["events"]
    assert double["event"] == "double_fault" and double["round"] == 1 and double["broker_killed_after_s"] <= 1
    assert full["event"] == "fill_store" and full["round"] == 2 and not json.loads((out / "chaos.json").read_text())["missed"]
    assert full["exited"] and full["exit_code"] == EXIT_STORAGE, full
    [line] = full["stderr"]  # one line: which store, what happened, what to do
    assert str(store) in line and "full" in line and "free space" in line
    assert fates.ok and fates.trained >= 4 * 4 and fates.accepted >= 4 * 2, fates
    assert (out / "logs" / "aggregator-3.log").exists()  # restarted after each fault, the last one finished the run

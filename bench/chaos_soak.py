"""Issue 3's chaos soak: the same fleet run twice, without faults and with all of them at once.

100 simulated agents (in 4 agent-host processes), 20 rounds. The chaos run adds: every agent
behind its own FaultProxy link that resets its connection on a random ~``--reset-prob`` of
chunks (message-level loss), 20% stragglers at 5x, 10% dropouts (mid-training or mid-upload,
half of them coming back), one aggregator SIGKILL mid-round and one Mosquitto SIGKILL+restart
mid-round. Prints JSON: per run, rounds completed, the ledger check (accepted update ids in the
store = the ids folded, none twice: every ``accepted`` receipt sent once, each version's sample
count = the sum over exactly its ids), receipts by status, final accuracy and wall time; and the
chaos run's measured message loss. Run: python -m bench.chaos_soak
"""

from __future__ import annotations

import argparse
import collections
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aggregator.ingest.pipeline import RELEASE_EVERY


def ledger(store: Path, kill_rounds: collections.Counter[int]) -> dict[str, Any]:
    """What the store says was accepted and folded, checked against itself.

    ``kill_rounds``: how many times the aggregator was SIGKILLed during each round.
    """
    with sqlite3.connect(store) as db:
        rounds = db.execute("SELECT round, closed, accepted, extensions, metrics FROM rounds ORDER BY round").fetchall()
        accepted = db.execute("SELECT update_id, round, num_samples FROM accepted").fetchall()
        receipts = db.execute("SELECT update_id, round, status FROM receipts").fetchall()
    by_round: dict[int, list[tuple[str, int]]] = collections.defaultdict(list)
    for update_id, number, samples in accepted:
        by_round[number].append((update_id, samples))
    accepted_receipts = collections.Counter(r[0] for r in receipts if r[2] == "accepted")
    problems = []
    unreceipted = 0
    for number, closed, count, _, metrics in rounds:
        ids = by_round[number]
        if closed is None:
            problems.append(f"round {number} never closed")
            continue
        if count != len(ids):
            problems.append(f"round {number}: {count} folded but {len(ids)} accepted ids")
        if json.loads(metrics).get("samples") != sum(s for _, s in ids):
            problems.append(f"round {number}: sample count != sum over its accepted ids (an update lost or counted twice)")
        receipted = {r[0] for r in receipts if r[2] == "accepted" and r[1] == number}
        folded_ids = {i for i, _ in ids}
        if not receipted <= folded_ids:
            problems.append(f"round {number}: accepted receipts for ids not folded")
        # An aggregator SIGKILLed between spooling updates and releasing their receipts (group commit:
        # one batch, at most RELEASE_EVERY) folds them without one (their resends get "duplicate"):
        # only in a round it was killed in, at most a batch per kill.
        missing = len(folded_ids - receipted)
        unreceipted += missing
        if missing > RELEASE_EVERY * kill_rounds[number]:
            problems.append(f"round {number}: {missing} updates folded without an accepted receipt, more than "
                            f"{kill_rounds[number]} aggregator kill(s) in that round explain")
    twice = [i for i, n in accepted_receipts.items() if n > 1]
    if twice:
        problems.append(f"accepted twice: {twice}")
    return {
        "rounds_completed": sum(1 for r in rounds if r[1] is not None),
        "extensions": sum(r[3] for r in rounds),
        "updates_folded": len(accepted),
        "folded_without_accepted_receipt": unreceipted,
        "ledger_ok": not problems,
        "ledger_problems": problems,
        "receipts": dict(collections.Counter(r[2] for r in receipts)),
    }


def run(out: Path, flags: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedge", "simulate", f"--out={out}", "--quiet", *flags],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"failed": done.returncode, "stderr": (done.stdout + done.stderr)[-3000:], "wall_seconds": round(wall, 1)}
    report = json.loads((out / "report.json").read_text())
    chaos = out / "chaos.json"
    record = json.loads(chaos.read_text()) if chaos.exists() else None
    kill_rounds = collections.Counter(e["round"] for e in (record or {}).get("events", []) if e["event"] == "kill_aggregator")
    if sum("--kill-aggregator-at" in f for f in flags) != sum(kill_rounds.values()):
        raise RuntimeError(f"the aggregator kills asked for and those recorded differ: {flags} / {kill_rounds}")
    result: dict[str, Any] = {
        "wall_seconds": round(wall, 1),
        "final_accuracy": round(report["totals"]["final_accuracy"], 4),
        "peak_rss_mib_sum": round(report["totals"]["peak_rss_mib_sum"], 1),
        **ledger(out / "aggregator.sqlite", kill_rounds),
    }
    if record is not None:
        links = record["links"].values()
        resets = sum(link["resets"] for link in links)
        chunks = sum(link["chunks"] for link in links)
        result["chaos"] = {
            "events": record["events"],
            "dropouts": record["dropouts"],
            "connections": sum(link["connections"] for link in links),
            "random_resets": resets,
            "cut_resets": sum(link["cut_resets"] for link in links),
            "chunk_loss": round(resets / max(1, chunks + resets), 4),  # chunks lost with their connection / chunks sent
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--agent-procs", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=4.0)
    parser.add_argument("--train-seconds", type=float, default=1.0, help="emulated training time of a normal device")
    parser.add_argument("--reset-prob", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=5.0,
                        help="Dirichlet label skew; digits has 1437 training images, too few for 100 clients at alpha < 5")
    args = parser.parse_args()
    common = [
        f"--agents={args.agents}", f"--rounds={args.rounds}", f"--agent-procs={args.agent_procs}", f"--seed={args.seed}", f"--alpha={args.alpha}",
        f"--target={args.agents}", f"--min={args.agents // 2}", f"--deadline={args.deadline}",
        f"--emulated-train-seconds={args.train_seconds}",
    ]
    chaos = [
        f"--reset-prob={args.reset_prob}", "--stragglers=0.2", "--slowdown=5", "--dropout=0.1", "--dropout-return=10",
        f"--kill-aggregator-at={max(1, args.rounds // 3)}", f"--restart-broker-at={max(1, 2 * args.rounds // 3)}",
    ]
    with tempfile.TemporaryDirectory(prefix="fedge-chaos-") as tmp:
        clean = run(Path(tmp) / "clean", common)
        faulty = run(Path(tmp) / "chaos", common + chaos)
    ok = all(r.get("ledger_ok") and r.get("rounds_completed") == args.rounds for r in (clean, faulty))
    gap = round(abs(clean.get("final_accuracy", 0) - faulty.get("final_accuracy", 1)) * 100, 2)
    print(json.dumps({
        "benchmark": "chaos_soak",
        "agents": args.agents, "rounds": args.rounds, "alpha": args.alpha, "deadline": args.deadline, "train_seconds": args.train_seconds,
        "chaos_flags": chaos,
        "clean": clean,
        "chaos": faulty,
        "accuracy_gap_points": gap,
        "pass": ok and gap <= 2.0,
        "targets": {"rounds_completed": args.rounds, "ledger_ok": True, "accuracy_gap_points_max": 2.0},
    }, indent=2))


if __name__ == "__main__":
    main()

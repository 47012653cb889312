"""Issues 3 and 19's chaos soak: the same fleet run twice per seed, without faults and with all of them.

100 simulated agents (in 4 agent-host processes), 20 rounds. The chaos run adds: every agent
behind its own FaultProxy link that resets its connection on a random ~``--reset-prob`` of
chunks (message-level loss), 20% stragglers at 5x, 10% dropouts (mid-training or mid-upload,
half of them coming back), and four real faults, each mid-round (once the round has updates):

- round 4: the aggregator SIGKILLed and restarted;
- round 8: the double fault of issue 19: the aggregator SIGKILLed, Mosquitto SIGKILLed 0.2-1 s
  later and restarted 2-3 s after that (the aggregator restarts at once, against the dead broker);
- round 12: Mosquitto SIGKILLed and restarted;
- round 16: the store's disk fills up. The store sits on a tmpfs of ``--store-mib`` MiB that this
  bench mounts (as root: run it so, or as ``unshare -Urm python -m bench.chaos_soak``); the
  aggregator must exit with code 74 and one line saying so; the space is freed and it is
  restarted, as its systemd unit would, and must finish the rounds.

Per run, two ledger checks. The store against itself (``ledger``): accepted update ids = the ids
folded, none twice, every ``accepted`` receipt recorded once, each version's sample count = the
sum over exactly its ids. And the fate of every update an agent trained (fedge/simulate/fates.py):
accepted, answered with a reason (stale, rejected), or dropped on purpose and counted by its
device (WARNING line = state.json = presence), never silently lost or counted twice.

Prints JSON: per seed, rounds completed, the faults injected, updates trained / accepted /
answered / dropped / lost / double-counted, the full store's exit, final accuracy of both runs
and the gap; on stderr the same as a Markdown table. Run: python -m bench.chaos_soak [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aggregator.ingest.pipeline import RELEASE_EVERY
from fedge.failures import EXIT_STORAGE
from fedge.simulate.disk_full import MountError, small_tmpfs
from fedge.simulate.fates import as_dict, update_fates

AGGREGATOR_ENDS = ("kill_aggregator", "double_fault", "fill_store")  # faults that end an aggregator mid-round
FLAG_EVENTS = {"--kill-aggregator-at": "kill_aggregator", "--double-fault-at": "double_fault",
               "--restart-broker-at": "restart_broker", "--fill-store-at": "fill_store"}


def ledger(store: Path, kill_rounds: collections.Counter[int]) -> dict[str, Any]:
    """What the store says was accepted and folded, checked against itself.

    ``kill_rounds``: how many times an aggregator ended during each round (SIGKILLed or stopped by its full disk).
    """
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
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
        # An aggregator that ends between spooling updates and recording their receipts (group commit:
        # one batch, at most RELEASE_EVERY) folds them without one (their resends get "duplicate"):
        # only in a round it ended in, at most a batch per end.
        missing = len(folded_ids - receipted)
        unreceipted += missing
        if missing > RELEASE_EVERY * kill_rounds[number]:
            problems.append(f"round {number}: {missing} updates folded without an accepted receipt, more than "
                            f"{kill_rounds[number]} aggregator end(s) in that round explain")
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


def full_store_check(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """How the aggregator ended on its full store: exit code 74 and one line naming the disk as full."""
    if event is None:
        return None
    lines = event.get("stderr", [])
    ok = bool(event.get("exited")) and event.get("exit_code") == EXIT_STORAGE and len(lines) == 1 and "full" in lines[0]
    return {"ok": ok, "exit_code": event.get("exit_code"), "seconds_to_exit": event.get("seconds_to_exit"), "line": lines[0] if lines else ""}


def run(out: Path, flags: list[str], store: Path | None = None) -> dict[str, Any]:
    store = store or out / "aggregator.sqlite"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedge", "simulate", f"--out={out}", f"--store={store}", "--quiet", "--log-json", *flags],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return {"failed": done.returncode, "stderr": (done.stdout + done.stderr)[-3000:], "wall_seconds": round(time.perf_counter() - start, 1)}
    return measure(out, flags, store)


def measure(out: Path, flags: list[str], store: Path) -> dict[str, Any]:
    """The figures of a finished run in ``out`` made with ``flags`` (its store at ``store``)."""
    report = json.loads((out / "report.json").read_text())
    chaos = out / "chaos.json"
    record = json.loads(chaos.read_text()) if chaos.exists() else None
    events = (record or {}).get("events", [])
    kill_rounds = collections.Counter(e["round"] for e in events if e["event"] in AGGREGATOR_ENDS)
    asked = sorted(FLAG_EVENTS[f.split("=", 1)[0]] for f in flags if f.split("=", 1)[0] in FLAG_EVENTS)
    injected = sorted(e["event"] for e in events if e["event"] in FLAG_EVENTS.values())
    if asked != injected:
        raise RuntimeError(f"the faults asked for and those injected differ: {asked} / {injected} (see {out})")
    fates = update_fates(out, store)
    result: dict[str, Any] = {
        "wall_seconds": round(report["totals"]["wall_seconds"], 1),
        "final_accuracy": round(report["totals"]["final_accuracy"], 4),
        "peak_rss_mib_sum": round(report["totals"]["peak_rss_mib_sum"], 1),
        **ledger(store, kill_rounds),
        "updates": as_dict(fates),
    }
    if record is not None:
        links = record["links"].values()
        resets = sum(link["resets"] for link in links)
        chunks = sum(link["chunks"] for link in links)
        result["chaos"] = {
            "events": events,
            "dropouts": record["dropouts"],
            "connections": sum(link["connections"] for link in links),
            "random_resets": resets,
            "cut_resets": sum(link["cut_resets"] for link in links),
            "chunk_loss": round(resets / max(1, chunks + resets), 4),  # chunks lost with their connection / chunks sent
        }
        result["full_store"] = full_store_check(next((e for e in events if e["event"] == "fill_store"), None))
    return result


@contextlib.contextmanager
def small_filesystem(folder: Path, mib: int) -> Iterator[Path]:
    """The small filesystem the full-store fault fills (fedge/simulate/disk_full.py)."""
    try:
        with small_tmpfs(folder, mib) as mounted:
            yield mounted
    except MountError as exc:
        raise SystemExit(f"chaos_soak: {exc}: run it as root, or as `unshare -Urm python -m bench.chaos_soak`, "
                         "or pass --no-full-store") from None


def flags_of(seed: int, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The clean run's flags and those the chaos run adds."""
    common = [
        f"--agents={args.agents}", f"--rounds={args.rounds}", f"--agent-procs={args.agent_procs}", f"--seed={seed}", f"--alpha={args.alpha}",
        f"--target={args.agents}", f"--min={args.agents // 2}", f"--deadline={args.deadline}",
        f"--emulated-train-seconds={args.train_seconds}",
    ]
    n = args.rounds
    chaos = [
        f"--reset-prob={args.reset_prob}", "--stragglers=0.2", "--slowdown=5", "--dropout=0.1", "--dropout-return=10",
        f"--kill-aggregator-at={max(1, n // 5)}", f"--double-fault-at={max(1, 2 * n // 5)}", f"--restart-broker-at={max(1, 3 * n // 5)}",
        *([f"--fill-store-at={max(1, 4 * n // 5)}"] if args.full_store else []),
    ]
    return common, chaos


def soak(seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    common, chaos = flags_of(seed, args)
    clean = run(tmp / f"clean-{seed}", common)
    if args.full_store:
        with small_filesystem(tmp / f"store-{seed}", args.store_mib) as folder:
            store = folder / "aggregator.sqlite"
            faulty = run(tmp / f"chaos-{seed}", [*common, *chaos], store)
            if store.exists():  # the tmpfs goes with its mount: keep a copy beside the run's other files
                with sqlite3.connect(store) as source, sqlite3.connect(tmp / f"chaos-{seed}" / "aggregator.sqlite") as copy:
                    source.backup(copy)
    else:
        faulty = run(tmp / f"chaos-{seed}", [*common, *chaos])
    return judge(seed, args, clean, faulty)


def remeasure(seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """``soak``'s result for runs already in ``tmp`` (kept by an earlier ``--keep``; the chaos run's store is its copy)."""
    common, chaos = flags_of(seed, args)
    return judge(seed, args, measure(tmp / f"clean-{seed}", common, tmp / f"clean-{seed}" / "aggregator.sqlite"),
                 measure(tmp / f"chaos-{seed}", [*common, *chaos], tmp / f"chaos-{seed}" / "aggregator.sqlite"))


def judge(seed: int, args: argparse.Namespace, clean: dict[str, Any], faulty: dict[str, Any]) -> dict[str, Any]:
    """One seed's result: both runs' figures, the accuracy gap, and whether every target held."""
    n = args.rounds
    gap = round(abs(clean.get("final_accuracy", 0) - faulty.get("final_accuracy", 1)) * 100, 2)
    runs_ok = all(r.get("ledger_ok") and r.get("rounds_completed") == n and r["updates"]["ok"] for r in (clean, faulty) if "failed" not in r)
    full_ok = not args.full_store or bool((faulty.get("full_store") or {}).get("ok"))
    ok = "failed" not in clean and "failed" not in faulty and runs_ok and full_ok and gap <= args.max_gap
    return {"seed": seed, "clean": clean, "chaos": faulty, "accuracy_gap_points": gap, "pass": ok}


def row(result: dict[str, Any]) -> dict[str, Any]:
    """One seed's figures, as the README's table shows them."""
    chaos, clean = result["chaos"], result["clean"]
    if "failed" in chaos or "failed" in clean:
        return {"seed": result["seed"], "failed": True}
    events = collections.Counter(e["event"] for e in chaos["chaos"]["events"])
    updates = chaos["updates"]
    return {
        "seed": result["seed"],
        "rounds": chaos["rounds_completed"],
        "aggregator_ends": sum(events[e] for e in AGGREGATOR_ENDS),
        "broker_kills": events["restart_broker"] + events["double_fault"],
        "full_store_exit": (chaos.get("full_store") or {}).get("exit_code"),
        "dropouts": len(chaos["chaos"]["dropouts"]),
        "random_resets": chaos["chaos"]["random_resets"],
        **{k: updates[k] for k in ("trained", "accepted", "answered", "dropped", "lost", "double_counted", "accepted_but_dropped")},
        "accuracy": chaos["final_accuracy"],
        "clean_accuracy": clean["final_accuracy"],
        "pass": result["pass"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("seed", "rounds", "aggregator ends (kill, double, full)", "broker kills", "full store exit", "dropouts", "resets",
            "trained", "accepted", "answered", "dropped", "lost", "double-counted", "accuracy (clean)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['seed']} | failed |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join(str(v) for v in (
            r["seed"], r["rounds"], r["aggregator_ends"], r["broker_kills"], r["full_store_exit"], r["dropouts"], r["random_resets"],
            r["trained"], r["accepted"], r["answered"], r["dropped"], r["lost"], r["double_counted"],
            f"{r['accuracy']:.3f} ({r['clean_accuracy']:.3f})")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--agent-procs", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=4.0)
    parser.add_argument("--train-seconds", type=float, default=1.0, help="emulated training time of a normal device")
    parser.add_argument("--reset-prob", type=float, default=0.1)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds, each a clean and a chaos run")
    parser.add_argument("--alpha", type=float, default=5.0,
                        help="Dirichlet label skew; digits has 1437 training images, too few for 100 clients at alpha < 5")
    parser.add_argument("--store-mib", type=int, default=16, help="size of the tmpfs the chaos run's store sits on")
    parser.add_argument("--no-full-store", dest="full_store", action="store_false", help="leave out the full-store fault (no mount)")
    parser.add_argument("--max-gap", type=float, default=2.0, help="accuracy points the chaos run may lose against the clean one")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder, removed)")
    parser.add_argument("--measure", action="store_true", help="run nothing: measure the runs kept in --keep by an earlier run")
    args = parser.parse_args()
    if args.measure and not args.keep:
        parser.error("--measure needs --keep (the folder holding the runs)")
    if args.rounds < 5:
        parser.error("--rounds must be >= 5 (four faults in rounds of their own)")
    seeds = [int(s) for s in args.seeds.split(",")]
    with contextlib.ExitStack() as stack:
        tmp = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedge-chaos-")))
        results = []
        for seed in seeds:
            results.append(remeasure(seed, args, tmp) if args.measure else soak(seed, args, tmp))
            if args.keep and not args.measure:  # kept as it comes: a soak stopped halfway keeps the seeds it finished
                (tmp / f"seed-{seed}.json").write_text(json.dumps(results[-1], indent=2))
            print(f"chaos_soak: seed {seed}: {'pass' if results[-1]['pass'] else 'FAIL'}", file=sys.stderr, flush=True)
    rows = [row(r) for r in results]
    print(json.dumps({
        "benchmark": "chaos_soak",
        "agents": args.agents, "rounds": args.rounds, "alpha": args.alpha, "deadline": args.deadline, "train_seconds": args.train_seconds,
        "reset_prob": args.reset_prob, "full_store": args.full_store,
        "table": rows,
        "seeds": results,
        "pass": all(r["pass"] for r in results),
        "targets": {"rounds_completed": args.rounds, "ledger_ok": True, "lost": 0, "double_counted": 0,
                    "full_store_exit": EXIT_STORAGE if args.full_store else None, "accuracy_gap_points_max": args.max_gap},
    }, indent=2))
    print(markdown(rows), file=sys.stderr)


if __name__ == "__main__":
    main()

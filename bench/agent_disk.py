"""How long the agent's event loop stalls while it persists an update: on the loop vs ``_on_disk``.

An agent that writes its outbox entry, residual and state on the loop (tmp, fsync, rename, fsync
of the folder, each) cannot answer a PUBACK or a keepalive meanwhile; ``Agent._on_disk`` runs the
same writes on a thread. This runs ``Agent._persist_update`` for ``--updates`` updates of
``--params`` float32 parameters (payload + residual of that size) both ways, in one run, with a
ticker task that wakes every millisecond and records the longest gap between its wake-ups: the
loop's stall. Figures: median and max stall per update, and the writes' wall time; ``idle`` is
the ticker's own gaps with nothing written (the floor on this machine).

Real files on the folder given by ``--dir`` (default: a temporary folder beside this checkout, on
its disk, not a tmpfs). The machine's disk and cores are shared: compare the two modes inside one
run. Prints JSON. Run: python -m bench.agent_disk [--updates 20] [--params 250000] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import Agent, AgentConfig
from fedge_contract import GlobalModel, TaskConfig, Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.tensors import ModelSpec


async def _stall_while(work: Any) -> tuple[float, float]:
    """(longest gap between a 1 ms ticker's wake-ups, wall seconds) while awaiting ``work``."""
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)  # the ticker runs before the work starts
    start = time.perf_counter()
    await work
    wall = time.perf_counter() - start
    done.set()
    await ticking
    return longest, wall


async def run(mode: str, root: Path, updates: int, params: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal(params).astype(np.float32)}
    agent = Agent(AgentConfig(BrokerAddress.parse("mqtt://127.0.0.1:1"), "bench", root / mode))
    agent._spec = ModelSpec.of(weights)
    tensors = encode_weights(weights, parse_chain("none"))
    stalls, walls = [], []
    for i in range(updates):
        model = GlobalModel("default", i, i + 1, None, TaskConfig(), agent._spec.fingerprint, tensors)
        update = Update("default", "bench", f"u{i}", round=i + 1, base_version=i, num_samples=1, tensors=tensors)
        payload, residual = update.to_bytes(), {"w": weights["w"] * 0.5}

        async def on_loop(m: GlobalModel = model, u: Update = update, p: bytes = payload, r: dict[str, Any] = residual) -> None:
            agent._persist_update(m, u, p, r)

        if mode == "idle":  # the floor: the ticker's own gaps on this machine, nothing written
            work: Any = asyncio.sleep(0.01)
        else:
            work = agent._on_disk(agent._persist_update, model, update, payload, residual) if mode == "thread" else on_loop()
        stall, wall = await _stall_while(work)
        stalls.append(stall * 1000)
        walls.append(wall * 1000)
    return {"stall_ms_median": round(statistics.median(stalls), 2), "stall_ms_max": round(max(stalls), 2),
            "write_ms_median": round(statistics.median(walls), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--params", type=int, default=250_000, help="float32 parameters per payload and residual")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary folder beside the checkout)")
    args = parser.parse_args()
    base = args.dir or Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(dir=base, prefix=".bench-agent-disk-") as folder:
        results = {mode: asyncio.run(run(mode, Path(folder), args.updates, args.params)) for mode in ("idle", "loop", "thread")}
    loop_stall, thread_stall = results["loop"]["stall_ms_median"], results["thread"]["stall_ms_median"]
    print(json.dumps({
        "updates": args.updates, "params": args.params, "payload_mib": round(args.params * 4 / 2**20, 2), **results,
        "stall_ratio_loop_over_thread": round(loop_stall / thread_stall, 1) if thread_stall else None,
    }, indent=2))


if __name__ == "__main__":
    main()

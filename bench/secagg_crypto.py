"""Issue 17's protocol core without transport: CPU seconds and bytes per device and for the server, per phase.

Runs the secure-aggregation state machines (fedge_contract/secagg) in one process, for a cohort of
``--devices`` (default 20 and 100) and models of ``--sizes`` parameters (``digits``: the digits MLP,
9,610 parameters, and 1M), with the parameters ``recommended`` for the cohort, 32-bit ring, each
device's input its delta (N(0, 0.01^2)) weighted and fixed-point encoded (one more coordinate for the
weight). ``--dropout`` fractions of the cohort are lost mid-protocol, half after sending their sealed
shares (their mask keys must be rebuilt and their pair masks removed), half after their masked input
(counted; they do not answer the unmask phase): the server's most expensive case.

Per phase (advertise, share, mask, unmask) and per device: CPU seconds (``time.process_time`` around
the device's own calls; the mask phase's figure includes the fixed-point encoding, also given alone
as ``encode``), bytes up (what the device publishes) and down (what it receives, broadcasts
included). For the server: CPU seconds per phase (taking the messages and ending the phase). Bytes
are compared with what a plain FedAvg device uploads per round for the same model (one Update,
codec ``none`` and the uploads' default chain, ``TaskConfig().codec``); the global model's download is the same
either way and left out.

One process, one core, on a machine shared with others: compare figures inside one run.
Prints JSON. Run: python -m bench.secagg_crypto [--quick] [--devices 20,100] [--sizes digits,1e6] [--dropout 0,0.3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import cryptography
import numpy as np

from bench.codecs import random_delta, update_bytes
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.messages import TaskConfig
from fedge_contract.secagg import (
    Aggregate,
    DeviceSession,
    KeyList,
    ServerMessage,
    ServerSession,
    Setup,
    ShareBundle,
    Weighting,
    new_session_id,
)
from fedge_contract.secagg.params import recommended

DIGITS_PARAMETERS = 9_610  # fedge_tasks.digits: Linear(64, 128) + Linear(128, 10)
PHASES = ("advertise", "share", "mask", "unmask")
DEFAULT_CODEC = TaskConfig().codec  # the uploads' default chain


class Meter:
    """CPU seconds and bytes, by party and phase."""

    def __init__(self) -> None:
        self.cpu: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.up: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.down: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    @contextlib.contextmanager
    def timed(self, party: str, phase: str) -> Iterator[None]:
        start = time.process_time()
        yield
        self.cpu[party][phase] += time.process_time() - start


def run_session(
    setup: Setup, server: ServerSession, meter: Meter, make_input: Callable[[str], np.ndarray], *, dropout: float = 0.0, seed: int = 0,
) -> Aggregate:
    """One session of the state machines in this process; ``make_input(client)`` is the device's ring vector."""
    rand = random.Random(seed).randbytes
    cohort = setup.cohort
    lost = list(np.random.default_rng(seed).permutation(cohort)[: round(dropout * len(cohort))])
    after_shares, after_masked = set(lost[: len(lost) // 2]), set(lost[len(lost) // 2 :])
    setup_bytes = len(setup.to_bytes())
    devices: dict[str, DeviceSession] = {}
    now = 0.0
    pending: list[ServerMessage] = []
    for client in cohort:  # advertise
        meter.down[client]["advertise"] += setup_bytes
        with meter.timed(client, "advertise"):
            devices[client] = DeviceSession(setup, client, random=rand)
        advert = devices[client].advertisement()
        meter.up[client]["advertise"] += len(advert.to_bytes())
        with meter.timed("server", "advertise"):
            pending += server.handle(advert, now=now).send
    for kind, phase in ((KeyList, "share"), (ShareBundle, "mask")):
        arrived, pending = pending, []
        for message in arrived:
            assert isinstance(message, kind)
            client = message.recipient
            if kind is ShareBundle and client in after_shares:
                continue
            meter.down[client][phase] += len(message.to_bytes())
            device = devices[client]
            with meter.timed(client, phase):
                reply = device.handle(message)
            if kind is ShareBundle:
                with meter.timed(client, phase):
                    reply = device.submit(make_input(client))
            assert reply is not None
            meter.up[client][phase] += len(reply.to_bytes())
            # handed on at once: the server folds a masked input into its sum, nothing here keeps the vectors
            with meter.timed("server", phase):
                pending += server.handle(reply, now=now).send
        if not pending:  # a phase still waiting for the lost devices: its deadline passes
            now = server.deadline
            with meter.timed("server", phase):
                pending = list(server.poll(now=now))
    (request,) = pending
    for client, device in devices.items():
        if client in after_shares or client in after_masked:
            continue
        meter.down[client]["unmask"] += len(request.to_bytes())
        with meter.timed(client, "unmask"):
            reveal = device.handle(request)
        assert reveal is not None
        meter.up[client]["unmask"] += len(reveal.to_bytes())
        with meter.timed("server", "unmask"):
            server.handle(reveal, now=now)
    if server.outcome is None:
        with meter.timed("server", "unmask"):
            server.poll(now=server.deadline)
    assert isinstance(server.outcome, Aggregate), server.outcome
    return server.outcome


def _random_input(setup: Setup, client: str, meter: Meter) -> np.ndarray:
    """A device's delta, weighted and fixed-point encoded (the encoding timed on its own as well)."""
    rng = np.random.default_rng(zlib.crc32(client.encode()))
    delta = rng.normal(0.0, 0.01, setup.length - 1)
    weighting = Weighting(clip=setup.clip, max_weight=1000)
    with meter.timed(client, "encode"):
        return setup.fixed_point.encode(weighting.vector(delta, 72), rng)


def _summary(values: list[float], digits: int = 4) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), digits), "max": round(max(values), digits)}


def run(devices: int, parameters: int, dropout: float, seed: int = 0) -> dict[str, Any]:
    rec = recommended(devices)
    setup = Setup(
        fleet="bench", round=1, session=new_session_id(random.Random(seed).randbytes), sender="aggregator",
        cohort=tuple(f"agent-{i:04d}" for i in range(devices)), degree=rec.degree, threshold=rec.threshold,
        min_survivors=rec.min_survivors, ring_bits=32, length=parameters + 1, clip=8.0,
    )
    meter = Meter()
    wall = time.perf_counter()
    server = ServerSession(setup, now=0.0, random=random.Random(seed + 1).randbytes)
    outcome = run_session(setup, server, meter, lambda client: _random_input(setup, client, meter), dropout=dropout, seed=seed)
    wall = time.perf_counter() - wall
    clients = list(setup.cohort)
    answered = [c for c in clients if meter.up[c]["unmask"]]  # devices that took part to the end
    per_device = {p: _summary([meter.cpu[c][p] for c in answered]) for p in (*PHASES, "encode")}
    totals = [sum(meter.cpu[c][p] for p in PHASES) for c in answered]
    bytes_up = {p: round(statistics.fmean(meter.up[c][p] for c in answered)) for p in PHASES}
    bytes_down = {p: round(statistics.fmean(meter.down[c][p] for c in answered)) for p in PHASES}
    total_bytes = sum(bytes_up.values()) + sum(bytes_down.values())
    delta = random_delta(parameters)
    plain = {chain: update_bytes(encode_weights(delta, parse_chain(chain), np.random.default_rng(0))) for chain in ("none", DEFAULT_CODEC)}
    return {
        "devices": devices, "parameters": parameters, "dropout": dropout,
        "degree": rec.degree, "threshold": rec.threshold, "survivors": outcome.count,
        "device_cpu_s": per_device, "device_cpu_total_s": _summary(totals),
        "server_cpu_s": {p: round(meter.cpu["server"][p], 4) for p in PHASES},
        "server_cpu_total_s": round(sum(meter.cpu["server"].values()), 3),
        "bytes_per_device": {"up": bytes_up, "down": bytes_down, "total": total_bytes},
        "plain_fedavg_update_bytes": plain,
        "ratio_to_plain": {chain: round(total_bytes / size, 2) for chain, size in plain.items()},
        "wall_s": round(wall, 2),
    }


def _sizes(text: str) -> list[int]:
    return [DIGITS_PARAMETERS if s == "digits" else int(float(s)) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="20,100", help="cohort sizes, comma-separated")
    parser.add_argument("--sizes", default="digits,1e6", help="parameters per model: digits or a number, comma-separated")
    parser.add_argument("--dropout", default="0,0.3", help="fractions of the cohort lost mid-protocol, comma-separated")
    parser.add_argument("--quick", action="store_true", help="20 devices, the digits model, no dropout")
    args = parser.parse_args()
    devices = [20] if args.quick else [int(d) for d in args.devices.split(",")]
    sizes = [DIGITS_PARAMETERS] if args.quick else _sizes(args.sizes)
    dropouts = [0.0] if args.quick else [float(d) for d in args.dropout.split(",")]
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "cryptography": cryptography.__version__,
                    "numpy": np.__version__},
        "params": {"ring_bits": 32, "clip": 8.0, "threshold_rule": "recommended(n)", "mask_prg": "ChaCha20", "aead": "ChaCha20-Poly1305"},
        "runs": [run(n, size, dropout) for size in sizes for n in devices for dropout in dropouts],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

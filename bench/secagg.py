"""Issue 17's benchmark: secure aggregation over a real Mosquitto against plain FedAvg, on digits.

For each cohort size (``--clients``, default 20 and 100) and dropout rate (``--dropout``, default 0,
0.1, 0.3), two runs of ``--rounds`` (30) synchronous rounds from the same initial model:

- ``plain``: every device publishes an Update (codec ``none``) on ``updates/<id>``; a loop standing
  in for the aggregator takes them off the broker and applies the sample-weighted mean;
- ``secure``: every device runs the agent's secure-aggregation module (edge_agent/secure_aggregation.py)
  on a connection of its own, and the aggregator's SecAggRelay (aggregator/secagg_relay.py) runs in
  a loop standing in for the coordinator; the round's mean is the relay's ``SecureMean``.

Training is real (digits MLP, the task's suggested settings, one torch thread, a seed per client and
round) and runs in this process before each round's protocol, the same way for both runs; the round's
*seconds* are the protocol's alone (from the announcement to the mean). What is not measured: the
global model's download (the same bytes either way), and the agent's event loop around the module
(the coordinator is a test loop until issue 14's round policy wires it).

Dropouts: each round a seeded ``dropout`` share of the cohort is lost mid-protocol, half after sending
their sealed shares (they count in no sum; their mask keys are rebuilt), half after their masked input
(they count; they never answer the unmask request). A lost device stops publishing for that round. The
plain run loses the same devices (the first half never sends its Update, the second half's counts),
so both runs average the same devices and the accuracy gap is the fixed point's alone. With dropouts,
a secure round waits for the mask and unmask phases' deadlines (``--mask-timeout``,
``--unmask-timeout``): its seconds are mostly those deadlines, while the plain loop here closes the
moment the last live update arrives (the fastest a plain round can close).

Reported per run: held-out accuracy after the last round, seconds per round (mean, max; for secure
runs also per phase: advertise includes each device's fsync of its session journal), bytes per
device per round (everything the device sent and received on the protocol's topics, mean over the
devices that were not lost; for plain, its Update), secure rounds abandoned and retried, the crypto's
CPU seconds per device per round (thread time inside the module: keys, Shamir, sealing, fixed-point
encoding, masking, reveals) and the relay's CPU seconds per round. One process, one broker, a 2-core
machine shared with others: compare the two runs of one size and dropout, not absolute figures.

Prints JSON. Run: python -m bench.secagg [--quick] [--clients 20,100] [--rounds 30] [--dropout 0,0.1,0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.secagg_relay import SecAggRelay, SecAggSettings, SecureMean
from bench.secagg_fixedpoint import _alpha, _unflat
from broker import LocalBroker
from edge_agent.secure_aggregation import SecureAggregation
from fedge_contract import GlobalModel, TaskConfig, Topics, Update
from fedge_contract.codecs import decode_weights, encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress, Connection
from fedge_contract.secagg import DeviceMessage, MaskedInput, PhaseTimeouts, Shares
from fedge_contract.secagg.topics import SecAggTopics
from fedge_contract.tensors import ModelSpec

DEFAULT_CODEC = "flat+topk:0.01+q4+zstd"
MAX_WEIGHT = 1000


class Lost(Exception):
    pass


class Device:
    """One simulated device: a connection, the secure-aggregation module, and a switch that loses it mid-round."""

    def __init__(self, address: BrokerAddress, fleet: str, client_id: str, state: Path) -> None:
        self.client_id = client_id
        self.address = address
        self.fleet = fleet
        self.secure = SecureAggregation(fleet=fleet, client_id=client_id, state_dir=state / client_id, max_message_bytes=8 << 20)
        self.topics = SecAggTopics(fleet)
        self.drop_after: type[DeviceMessage] | None = None  # this round: lost right after publishing this
        self.silent = False
        self.bytes_up = 0
        self.ready = asyncio.Event()
        self.conn: Connection | None = None

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.silent:
            return
        assert self.conn is not None
        await self.conn.publish(topic, payload, retain=retain)
        self.bytes_up += len(payload)
        if self.drop_after is not None and topic == self.topics.device(self.drop_after, self.client_id):
            self.silent = True

    async def run(self, spec: ModelSpec, secure: bool) -> None:
        subscriptions = self.secure.subscriptions() if secure else []
        async with Connection(self.address, f"bench-{self.client_id}-{self.fleet}"[:64], subscriptions=subscriptions, persistent=False) as conn:
            self.conn = conn
            self.secure.attach(self, spec)
            await conn.wait_connected()
            self.ready.set()
            while True:
                message = await conn.messages.get()
                if isinstance(message.payload, bytes) and not self.silent:
                    await self.secure.on_message(str(message.topic), message.payload)


@dataclass
class Trainer:
    """Digits clients trained in this process: each round's deltas from the current global weights."""

    clients: int
    seed: int = 0
    task: Any = None
    names: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        from fedge_tasks.digits import DigitsTask
        from fedge_tasks.weights import get_weights

        torch.set_num_threads(1)
        torch.manual_seed(self.seed)
        self.task = DigitsTask(clients=self.clients, alpha=_alpha(self.clients))
        self.model = self.task.build_model()
        weights = get_weights(self.model)
        self.names, self.shapes = list(weights), {n: w.shape for n, w in weights.items()}
        self.initial = np.concatenate([w.ravel() for w in weights.values()]).astype(np.float64)
        self.spec = ModelSpec.of(weights)

    def deltas(self, flat: np.ndarray, ids: Sequence[str], round_no: int) -> dict[str, tuple[dict[str, np.ndarray], int]]:
        from fedge_tasks import TrainSettings, train
        from fedge_tasks.weights import get_weights, set_weights

        s = self.task.suggested_training()
        out = {}
        for client in ids:
            set_weights(self.model, _unflat(flat, self.names, self.shapes))
            settings = TrainSettings(epochs=int(s["local_epochs"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                                     seed=zlib.crc32(f"{client}:{round_no}".encode()))
            result = train(self.model, self.task.train_data(client), settings)
            local = get_weights(self.model)
            out[client] = ({n: (local[n].astype(np.float64) - _unflat(flat, self.names, self.shapes)[n]).astype(np.float32)
                            for n in self.names}, result.num_samples)
        return out

    def accuracy(self, flat: np.ndarray) -> float:
        from fedge_tasks import evaluate
        from fedge_tasks.weights import set_weights

        set_weights(self.model, _unflat(flat, self.names, self.shapes))
        return float(evaluate(self.model, self.task.eval_data())["accuracy"])

    def flatten(self, delta: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([delta[n].ravel() for n in self.names]).astype(np.float64)


def _lost(ids: Sequence[str], dropout: float, round_no: int, seed: int) -> tuple[set[str], set[str]]:
    """(lost after their shares, lost after their masked input) for this round."""
    lost = list(np.random.default_rng([seed, round_no]).permutation(sorted(ids))[: round(dropout * len(ids))])
    return set(lost[: len(lost) // 2]), set(lost[len(lost) // 2 :])


async def _drive(relay: SecAggRelay, conn: Connection, phases: dict[str, list[float]]) -> None:
    """The coordinator's loop around the relay, until it has an outcome; each phase's seconds go to ``phases``."""
    phase, since = relay.phase, time.perf_counter()
    while relay.outcome is None:
        wake = relay.next_wake()
        try:
            async with asyncio.timeout(None if wake is None else max(0.0, wake - time.monotonic())):
                message = await conn.messages.get()
        except TimeoutError:
            await relay.on_wake(now=time.monotonic())
        else:
            if relay.owns(str(message.topic)) and isinstance(message.payload, bytes):
                await relay.on_message(str(message.topic), message.payload, now=time.monotonic())
        if relay.phase is not phase and phase is not None:
            phases.setdefault(phase.value, []).append(time.perf_counter() - since)
            phase, since = relay.phase, time.perf_counter()


async def run(address: BrokerAddress, clients: int, rounds: int, dropout: float, mode: str, timeouts: PhaseTimeouts,
              seed: int = 0) -> dict[str, Any]:
    trainer = Trainer(clients, seed)
    spec = trainer.spec
    fleet = f"bench-{mode}-{clients}-{round(dropout * 100)}"
    ids = [f"agent-{i}" for i in range(clients)]
    settings = SecAggSettings(max_weight=MAX_WEIGHT, timeouts=timeouts)
    topics = Topics(fleet)
    flat = trainer.initial.copy()
    seconds, bytes_per_device, abandoned, crypto, relay_cpu, survivors = [], [], 0, [], [], []
    phases: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as state:
        devices = {c: Device(address, fleet, c, Path(state)) for c in ids}
        secure = mode == "secure"
        subscriptions = [SecAggTopics(fleet).all_from_devices] if secure else [topics.all_updates]
        async with Connection(address, f"bench-coordinator-{fleet}"[:64], subscriptions=subscriptions, persistent=False) as conn:
            tasks = [asyncio.create_task(d.run(spec, secure)) for d in devices.values()]
            try:
                await asyncio.wait_for(asyncio.gather(*(d.ready.wait() for d in devices.values())), 60)
                await conn.wait_connected()
                relay = SecAggRelay(fleet, conn, spec, spool=_discard_masked, checkpoint=_discard_checkpoint, settings=settings)
                for round_no in range(1, rounds + 1):
                    deltas = await asyncio.to_thread(trainer.deltas, flat, ids, round_no)
                    after_shares, after_masked = _lost(ids, dropout, round_no, seed)
                    crypto_before = {c: d.secure.stats.crypto_seconds for c, d in devices.items()}
                    traffic_before = {c: d.bytes_up + d.secure.stats.bytes_down for c, d in devices.items()}
                    cpu_before = relay.stats.cpu_seconds
                    for c, d in devices.items():
                        d.silent = False
                        d.drop_after = Shares if c in after_shares else MaskedInput if c in after_masked else None
                    if secure:  # training done: each device holds its delta for the round (the plain agent's outbox write is not timed either)
                        await _hand_over(devices, deltas, fleet, round_no, spec, settings)
                    start = time.perf_counter()
                    if secure:
                        mean, counted, tries = await _secure_round(relay, conn, devices, round_no, spec, phases)
                        abandoned += tries - 1
                    else:
                        mean, counted = await _plain_round(conn, devices, deltas, topics, round_no, spec, after_shares)
                    seconds.append(time.perf_counter() - start)
                    survivors.append(counted)
                    live = [c for c in ids if c not in after_shares and c not in after_masked]
                    traffic = (devices[c].bytes_up + devices[c].secure.stats.bytes_down - traffic_before[c] for c in live)
                    bytes_per_device.append(statistics.mean(traffic))
                    if secure:
                        crypto.append(statistics.mean(devices[c].secure.stats.crypto_seconds - crypto_before[c] for c in live))
                        relay_cpu.append(relay.stats.cpu_seconds - cpu_before)
                    flat = flat + mean
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    result: dict[str, Any] = {
        "clients": clients, "alpha": trainer.task.alpha, "mode": mode, "dropout": dropout, "rounds": rounds,
        "accuracy": round(trainer.accuracy(flat), 4),
        "seconds_per_round": {"mean": round(statistics.mean(seconds), 3), "max": round(max(seconds), 3)},
        "bytes_per_device_per_round": round(statistics.mean(bytes_per_device)),
        "inputs_per_round": round(statistics.mean(survivors), 1),
    }
    if secure:
        result.update({
            "abandoned_and_retried": abandoned,
            "crypto_cpu_seconds_per_device_per_round": round(statistics.mean(crypto), 5),
            "relay_cpu_seconds_per_round": round(statistics.mean(relay_cpu), 4),
            "seconds_per_phase": {p: round(statistics.mean(v), 3) for p, v in phases.items()},
        })
    return result


async def _discard_masked(session: str, client: str, payload: bytes) -> None:
    """The bench keeps no spool (a store would write it to disk here)."""


async def _discard_checkpoint(snapshot: dict[str, Any]) -> None:
    """The bench keeps no checkpoints (a store would write them to disk here)."""


async def _hand_over(devices: dict[str, Device], deltas: dict[str, tuple[dict[str, np.ndarray], int]], fleet: str, round_no: int,
                     spec: ModelSpec, settings: SecAggSettings) -> None:
    task = TaskConfig(codec="none", extra=settings.announcement.to_extra())
    model = GlobalModel(fleet, round_no - 1, round_no, None, task, spec.fingerprint, ())
    for client, device in devices.items():
        await device.secure.on_announcement(model)
        await device.secure.submit(model, *deltas[client])


async def _secure_round(relay: SecAggRelay, conn: Connection, devices: dict[str, Device], round_no: int, spec: ModelSpec,
                        phases: dict[str, list[float]]) -> tuple[np.ndarray, int, int]:
    for tries in range(1, 4):
        await relay.start(round_no, sorted(devices), now=time.monotonic())
        await _drive(relay, conn, phases)
        outcome = relay.outcome
        if isinstance(outcome, SecureMean):
            return np.concatenate([outcome.delta[t.name].ravel() for t in spec.tensors]).astype(np.float64), outcome.count, tries
        for device in devices.values():  # the retry: nobody drops
            device.silent, device.drop_after = False, None
    raise RuntimeError(f"round {round_no}: three sessions abandoned: {relay.outcome}")


async def _plain_round(conn: Connection, devices: dict[str, Device], deltas: dict[str, tuple[dict[str, np.ndarray], int]], topics: Topics,
                       round_no: int, spec: ModelSpec, lost: set[str]) -> tuple[np.ndarray, int]:
    chain = parse_chain("none")
    senders = [c for c in devices if c not in lost]
    for client in senders:
        delta, samples = deltas[client]
        update = Update(topics.fleet, client, f"{client}-r{round_no}", round_no, round_no - 1, samples, encode_weights(delta, chain))
        await devices[client].publish(topics.update(client), update.to_bytes())
    total, weight, got = np.zeros(spec.num_parameters), 0.0, set()
    while len(got) < len(senders):
        message = await conn.messages.get()
        payload = message.payload
        assert isinstance(payload, bytes)
        update = Update.from_bytes(payload, max_bytes=1 << 24, fleet=topics.fleet)
        if update.round != round_no or update.client_id in got:
            continue
        got.add(update.client_id)
        decoded = decode_weights(update.tensors, spec)
        total += np.concatenate([decoded[t.name].ravel() for t in spec.tensors]).astype(np.float64) * update.num_samples
        weight += update.num_samples
    return total / weight, len(got)


def _default_codec_bytes(clients: int) -> int:
    """One digits Update under the default codec (top-k 1%, q4, zstd), for reference."""
    trainer = Trainer(clients)
    deltas = trainer.deltas(trainer.initial, ["agent-0"], 1)
    delta, samples = deltas["agent-0"]
    rng = np.random.default_rng(0)
    return len(Update("bench", "agent-0", "u", 1, 0, samples, encode_weights(delta, parse_chain(DEFAULT_CODEC), rng)).to_bytes())


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    timeouts = PhaseTimeouts(advertise=20.0, share=args.share_timeout, mask=args.mask_timeout, unmask=args.unmask_timeout)
    clients = [20] if args.quick else [int(c) for c in args.clients.split(",")]
    dropouts = [0.0, 0.3] if args.quick else [float(d) for d in args.dropout.split(",")]
    rounds = 3 if args.quick else args.rounds
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        async with LocalBroker(data_dir=Path(folder)) as broker:
            address = BrokerAddress.parse(broker.url)
            for n in clients:
                for dropout in dropouts:
                    pair = [await run(address, n, rounds, dropout, mode, timeouts) for mode in ("plain", "secure")]
                    plain, secure = pair
                    runs.append({
                        "clients": n, "dropout": dropout, "plain": plain, "secure": secure,
                        "accuracy_gap_points": round(100 * (secure["accuracy"] - plain["accuracy"]), 2),
                        "bytes_ratio": round(secure["bytes_per_device_per_round"] / plain["bytes_per_device_per_round"], 3),
                        "seconds_ratio": round(secure["seconds_per_round"]["mean"] / plain["seconds_per_round"]["mean"], 2),
                    })
                    print(json.dumps(runs[-1]), flush=True, file=sys.stderr)  # progress: a full run takes a while
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "timeouts": {"share": timeouts.share, "mask": timeouts.mask, "unmask": timeouts.unmask},
        "max_weight": MAX_WEIGHT, "default_codec_update_bytes": {n: _default_codec_bytes(n) for n in clients},
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="20,100")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dropout", default="0,0.1,0.3")
    parser.add_argument("--share-timeout", type=float, default=10.0)
    parser.add_argument("--mask-timeout", type=float, default=4.0)
    parser.add_argument("--unmask-timeout", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="20 clients, 3 rounds, dropout 0 and 0.3")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()

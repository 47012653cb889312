"""The ``fedge`` command: broker, aggregator, agent and simulate.

Flags map one-to-one onto the config dataclasses (AggregatorConfig, AgentConfig,
SimulationOptions), which validate themselves; this module only parses and dispatches.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from fedge.logs import setup_logging
from fedge.peak_memory import report_at_exit
from fedge_contract.aio import cancel_and_wait

log = logging.getLogger("fedge")


def _training_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("local training (sent to agents each round; default: the task's suggestion)")
    group.add_argument("--local-epochs", type=int, help="epochs over the device's data per round")
    group.add_argument("--batch-size", type=int)
    group.add_argument("--lr", type=float, help="local SGD learning rate")
    group.add_argument("--momentum", type=float)
    group.add_argument("--mu", type=float, help="FedProx proximal weight (0 = FedAvg)")
    group.add_argument("--codec", help="update codec chain agents must use, e.g. zstd, f16+zstd, none (default zstd)")


def _round_flags(parser: argparse.ArgumentParser, *, target_default: int | None) -> None:
    group = parser.add_argument_group("rounds")
    group.add_argument("--rounds", type=int, default=30, help="model versions to produce (0 = forever); default 30")
    group.add_argument("--target", type=int, default=target_default, help="updates that close a round early")
    group.add_argument("--min", dest="min_updates", type=int, help="updates needed to close at the deadline (default: 1)")
    group.add_argument("--deadline", type=float, default=60.0, help="seconds a round stays open before closing or extending")
    group.add_argument("--strategy", default="fedavg", help="server aggregation strategy (default fedavg)")
    group.add_argument("--global-codec", default="none", help="codec of the broadcast model, e.g. f16+zstd")


def _task_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="digits", help="MODULE:OBJECT of a fedge task, or a built-in name (digits)")
    parser.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE", help="option passed to the task (repeatable)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-file", type=Path, help="log here instead of stderr")


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ["local_epochs", "batch_size", "lr", "momentum", "mu", "codec"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge", description="Federated learning for fleets of edge devices over MQTT.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run a local Mosquitto with fedge's dev config (foreground, Ctrl-C stops)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--data-dir", type=Path, help="persistence folder (default: a temporary one)")
    _common(p)

    p = sub.add_parser("aggregator", help="run the aggregator service for one fleet")
    p.add_argument("--broker", required=True, help="mqtt://[user:password@]host:port or mqtts://...")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--fleet", default="default")
    _task_flags(p)
    _round_flags(p, target_default=10)
    _training_flags(p)
    p.add_argument("--store", type=Path, default=Path("fedge-aggregator.sqlite"), help="SQLite store (checkpoints, rounds)")
    p.add_argument("--max-update-bytes", type=int, help="largest update accepted (default: 1.25x the float32 model)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating each model on the task's held-out data")
    _common(p)

    p = sub.add_parser("agent", help="run an edge agent")
    p.add_argument("--broker", required=True)
    p.add_argument("--ca-file")
    p.add_argument("--fleet", default="default")
    p.add_argument("--client-id", required=True, help="this device's id (letters, digits, . _ -)")
    p.add_argument("--state-dir", type=Path, required=True, help="outbox and state (keep it across restarts)")
    _task_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--exit-when-final", action="store_true", help="exit once the aggregator publishes its final model")
    _common(p)

    p = sub.add_parser("simulate", help="simulate a fleet on a local broker and write a report")
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew of the digits partition")
    p.add_argument("--seed", type=int, default=0, help="seeds the partition, the initial model and local shuffling")
    _round_flags(p, target_default=None)
    _training_flags(p)
    p.add_argument("--out", type=Path, help="report folder (default runs/sim-<time>)")
    p.add_argument("--agent-procs", type=int, default=1, help="processes hosting the agents (each its own MQTT connections)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines, only the final table")
    _common(p)

    p = sub.add_parser("_agent-host", help=argparse.SUPPRESS)  # internal: many agents in one process, for simulate
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--client-ids", required=True)
    p.add_argument("--state-root", type=Path, required=True)
    _task_flags(p)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    report_at_exit(args.command)
    handler = {
        "broker": _run_broker,
        "aggregator": _run_aggregator,
        "agent": _run_agent,
        "simulate": _run_simulate,
        "_agent-host": _run_agent_host,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # configuration and environment problems: say what, not a traceback
        log.debug("fatal", exc_info=True)
        print(f"fedge {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    """Run until done or SIGTERM/SIGINT, which cancel the main task so every context manager unwinds."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        main_task = asyncio.create_task(coro, name="main")
        stopper = asyncio.create_task(stop.wait(), name="signals")
        await asyncio.wait({main_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not main_task.done():
            await cancel_and_wait([main_task])
            return 130
        await cancel_and_wait([stopper])
        return main_task.result() or 0

    return asyncio.run(runner())


def _run_broker(args: argparse.Namespace) -> int:
    from broker import LocalBroker

    async def serve() -> int:
        async with LocalBroker(port=args.port, host=args.host, data_dir=args.data_dir) as running:
            print(f"mosquitto listening on {running.url} (Ctrl-C stops)", flush=True)
            await asyncio.Event().wait()
        return 0

    return _run(serve())


def _run_aggregator(args: argparse.Namespace) -> int:
    from aggregator import Aggregator, AggregatorConfig
    from fedge_contract.mqtt import BrokerAddress
    from fedge_tasks.base import parse_options

    config = AggregatorConfig(
        broker=BrokerAddress.parse(args.broker, ca_file=args.ca_file),
        fleet=args.fleet,
        task=args.task,
        task_options=parse_options(args.task_opt),
        rounds=args.rounds,
        target=args.target,
        min_updates=args.min_updates or 1,
        deadline=args.deadline,
        training=training_overrides(args),
        strategy=args.strategy,
        global_codec=args.global_codec,
        store=args.store,
        max_update_bytes=args.max_update_bytes,
        evaluate=not args.no_eval,
    )
    return _run(Aggregator(config).run())


def _run_agent(args: argparse.Namespace) -> int:
    from edge_agent import Agent, AgentConfig
    from fedge_contract.mqtt import BrokerAddress
    from fedge_tasks.base import parse_options

    config = AgentConfig(
        broker=BrokerAddress.parse(args.broker, ca_file=args.ca_file),
        client_id=args.client_id,
        state_dir=args.state_dir,
        fleet=args.fleet,
        task=args.task,
        task_options=parse_options(args.task_opt),
        seed=args.seed,
        torch_threads=args.torch_threads,
        exit_when_final=args.exit_when_final,
    )
    return _run(Agent(config).run())


def _run_agent_host(args: argparse.Namespace) -> int:
    from fedge.simulate.agent_host import host_agents

    return _run(host_agents(args))


def _run_simulate(args: argparse.Namespace) -> int:
    from fedge.simulate.runner import SimulationOptions, simulate

    options = SimulationOptions(
        agents=args.agents,
        rounds=args.rounds,
        alpha=args.alpha,
        seed=args.seed,
        target=args.target,
        min_updates=args.min_updates,
        deadline=args.deadline,
        strategy=args.strategy,
        global_codec=args.global_codec,
        training=training_overrides(args),
        out=args.out,
        agent_procs=args.agent_procs,
        quiet=args.quiet,
        log_level=args.log_level,
    )
    return _run(simulate(options))

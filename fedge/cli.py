"""The ``fedge`` command: broker, aggregator, agent and simulate.

Flags map one-to-one onto the config dataclasses (AggregatorConfig, AgentConfig,
SimulationOptions), which validate themselves; this module only parses and dispatches. The
aggregator's and the agent's flags are generated from their settings' dataclasses
(aggregator/config.py, edge_agent/settings.py, through fedge_runtime/settings.py), so a flag, a
FEDGE_* variable and a TOML key are one setting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aggregator.errors import AggregatorError
from broker.errors import BrokerError
from edge_agent.errors import AgentError
from fedge.errors import CommandError
from fedge.failures import EXIT_CODES_HELP, EXIT_INTERRUPTED, EXIT_STORAGE, EXIT_USAGE, storage_failure
from fedge.peak_memory import report_at_exit
from fedge.running import run_until_stopped as _run
from fedge_contract.errors import ContractError
from fedge_runtime.logs import setup_logging
from fedge_runtime.settings import SettingsError
from fedge_tasks.base import TaskLoadError

log = logging.getLogger("fedge")
T = TypeVar("T")

# What a user can cause and fix: each package's root, and the environment's OSError. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    SettingsError, CommandError, AgentError, AggregatorError, ContractError, TaskLoadError,
    BrokerError, OSError,
)


def configured(build: Callable[[], T]) -> T:
    """Build a command's config; the configs not yet on the settings loader (the aggregator's, the
    simulation's) validate themselves with ValueError, which only here means a bad flag."""
    try:
        return build()
    except SettingsError:
        raise
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def _client_certificate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert-file", help="client certificate for a broker that requires one (fedge broker add-device ID --cert)")
    parser.add_argument("--key-file", help="the client certificate's private key (with --cert-file)")


def _task_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="digits", help="MODULE:OBJECT of a fedge task, or a built-in name (digits, synthetic)")
    parser.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE", help="option passed to the task (repeatable)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-file", type=Path, help="log here instead of stderr")
    parser.add_argument("--log-json", action="store_true",
                        help="one JSON object per line (ts, level, logger, message, client, update, round, reason)")


def _chaos_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("faults (fedge.netem: each agent reaches the broker through its own faulty link)")
    group.add_argument("--network", choices=["lan", "wifi", "cellular", "flaky"], help="link profile of every agent")
    group.add_argument("--latency-ms", type=float, help="added one-way latency (overrides the profile)")
    group.add_argument("--jitter-ms", type=float, help="latency varies by +- this much, never reordering bytes")
    group.add_argument("--bandwidth-kbps", type=float, help="bandwidth cap per connection and direction, kbit/s")
    group.add_argument("--reset-prob", type=float, help="probability that a forwarded chunk is lost with its connection (TCP RST)")
    group.add_argument("--faults", default="", metavar="SCHEDULE",
                       help="e.g. 'agent-7@r3+20' (cut agent-7 for 20 s when round 3 opens), 'agent-2@t30+5', 'agent-4@r2^inf' "
                            "(vanish mid-upload); see fedge/netem/schedule.py")
    group.add_argument("--dropout", type=float, default=0.0, help="fraction of agents that vanish once, mid-training or mid-upload")
    group.add_argument("--dropout-return", type=float, default=10.0, help="seconds until half the dropouts come back (default 10)")
    group.add_argument("--late-joiners", type=float, default=0.0, help="fraction of agents that only start at --late-join-round")
    group.add_argument("--late-join-round", type=int, default=2)
    group.add_argument("--kill-aggregator-at", type=int, metavar="ROUND", help="SIGKILL the aggregator mid-round ROUND, restart it")
    group.add_argument("--restart-broker-at", type=int, metavar="ROUND", help="SIGKILL Mosquitto mid-round ROUND, restart it")
    group.add_argument("--double-fault-at", type=int, metavar="ROUND",
                       help="SIGKILL the aggregator mid-round ROUND and Mosquitto within a second after it; restart both")
    group.add_argument("--fill-store-at", type=int, metavar="ROUND",
                       help="fill the store's disk mid-round ROUND (the aggregator must exit with code 74), free it, restart the "
                            "aggregator; needs --store on a small filesystem of its own")


def chaos_options(args: argparse.Namespace) -> Any:
    from fedge.simulate.chaos import ChaosOptions

    return ChaosOptions(
        network=args.network, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, bandwidth_kbps=args.bandwidth_kbps,
        reset_prob=args.reset_prob, faults=args.faults, dropout=args.dropout, dropout_return=args.dropout_return,
        late_joiners=args.late_joiners, late_join_round=args.late_join_round,
        kill_aggregator_round=args.kill_aggregator_at, restart_broker_round=args.restart_broker_at,
        double_fault_round=args.double_fault_at, fill_store_round=args.fill_store_at,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge", description="Federated learning for fleets of edge devices over MQTT.", epilog=EXIT_CODES_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "broker", help="run a local dev Mosquitto, or provision and run a production one (TLS, accounts, ACL)",
        description="Without an action: a local dev broker (anonymous, loopback). Production: `init --tls DIR`, then "
                    "`add-device ID --config DIR` per device and `serve --config DIR`.",
    )
    p.add_argument("action", nargs="?", choices=["init", "serve", "add-device", "remove-device", "list-devices"],
                   help="init: create CA, certificates, config, ACL and the aggregator's account in DIR; serve: run DIR's config; "
                        "add-device/remove-device ID: manage a device's account; list-devices")
    p.add_argument("device", nargs="?", metavar="ID", help="device (client) id for add-device/remove-device")
    p.add_argument("--tls", "--config", dest="config_dir", type=Path, metavar="DIR", help="production broker folder (default ./fedge-broker)")
    p.add_argument("--fleet", default="default", help="init: the fleet whose topics the ACL covers")
    p.add_argument("--port", type=int, default=None, help="dev: port (default a free one); init: TLS port (default 8883)")
    p.add_argument("--host", default=None,
                   help="dev: address to listen on (default 127.0.0.1); init: the name devices use to reach the broker (default localhost)")
    p.add_argument("--bind", help="init: listen on this address only (default: all)")
    p.add_argument("--auth", choices=["password", "certificate", "both"], default="password",
                   help="init: how devices authenticate: password (default), certificate (client certificates required), "
                        "or both (passwords on --port, certificates on --cert-port)")
    p.add_argument("--cert-port", type=int, help="init --auth both: the certificate listener's port (default --port + 1, 8884)")
    p.add_argument("--cert", action="store_true", help="add-device: issue a client certificate from the fleet CA instead of a password")
    p.add_argument("--data-dir", type=Path, help="dev: persistence folder (default: a temporary one)")
    _common(p)

    p = sub.add_parser(
        "aggregator", help="run the aggregator service for one fleet",
        description="Settings come from flags, FEDGE_* environment variables and --config FILE (TOML), in that order.",
    )
    p.add_argument("--config", type=Path, help="TOML settings file (default: $FEDGE_CONFIG)")
    aggregator_settings().add_flags(p)  # generated from AggregatorConfig (aggregator/config.py)
    _common(p)

    p = sub.add_parser(
        "agent", help="run an edge agent (or `fedge agent doctor`: check this device)",
        description="Settings come from flags, FEDGE_* environment variables and --config FILE (TOML), in that order.",
    )
    p.add_argument("action", nargs="?", choices=["run", "doctor"], default="run",
                   help="run (default) or doctor: print what this device reports and what is wrong")
    p.add_argument("--config", type=Path, help="TOML settings file (default: $FEDGE_CONFIG)")
    from edge_agent.settings import add_flags as add_agent_flags

    add_agent_flags(p)  # generated from AgentConfig and Policy (edge_agent/settings.py)
    _common(p)

    p = sub.add_parser("simulate", help="simulate a fleet on a local broker and write a report")
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew of the digits partition")
    p.add_argument("--seed", type=int, default=0, help="seeds the partition, the initial model and local shuffling")
    group = p.add_argument_group("rounds")
    group.add_argument("--rounds", type=int, default=30, help="model versions to produce (default 30)")
    group.add_argument("--target", type=int, help="updates that close a round early (default: every agent)")
    group.add_argument("--min", dest="min_updates", type=int, help="updates needed to close at the deadline (default: the target)")
    group.add_argument("--deadline", type=float, default=60.0, help="seconds a round stays open before closing or extending")
    aggregator_settings().add_flags(p, include=_passed_to_aggregator)  # the aggregator's own flags, passed on to it
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="another option for the task, e.g. min_samples=5 (digits over 100 devices at alpha 0.5)")
    p.add_argument("--stragglers", type=float, default=0.0, help="fraction of agents made --slowdown times slower (default 0)")
    p.add_argument("--slowdown", type=float, default=5.0, help="how much slower the stragglers are (default 5)")
    p.add_argument("--emulated-train-seconds", type=float, default=0.0,
                   help="make every agent's training last at least this long (emulates devices slower than this host; "
                        "training is serialised here, so stragglers only matter when this dominates)")
    _chaos_flags(p)
    p.add_argument("--out", type=Path, help="report folder (default runs/sim-<time>)")
    p.add_argument("--store", type=Path, help="the aggregator's store (default OUT/aggregator.sqlite)")
    p.add_argument("--agent-procs", "--hosts", type=int,
                   help="processes hosting the agents, each agent with its own MQTT connection "
                        "(default 1; synthetic: one per 2,500 agents)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines, only the final table")
    group = p.add_argument_group("synthetic load (measure the transport and the aggregator, not learning)")
    group.add_argument("--synthetic", action="store_true",
                       help="agents send seeded N(0, 0.01^2) deltas of a --params model with the round's --codec instead of training")
    group.add_argument("--params", type=int, default=1_000_000, help="synthetic: parameters of the model (default 1,000,000)")
    group.add_argument("--downloads", choices=["host", "all"], default="host",
                       help="synthetic: each host process downloads the global model once and tells its agents (default), "
                            "or every agent downloads it (agents x model bytes through the broker per round)")
    p.add_argument("--attack", action="append", default=[], help=argparse.SUPPRESS)  # TEST ONLY: ID=none|scale10|signflip|nan
    _common(p)

    p = sub.add_parser("status", help="show a fleet live: round, progress, devices and why they are not training")
    p.add_argument("--broker", required=True, help="mqtt://[user:password@]host:port or mqtts://...")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    _client_certificate_flags(p)
    p.add_argument("--fleet", default="default")
    p.add_argument("--once", action="store_true", help="print one snapshot of the retained state and exit")
    _common(p)

    p = sub.add_parser("report", help="render a run's store to PNG plots and an HTML page",
                       description="Reads RUN_DIR/aggregator.sqlite (a simulate run folder), the folder's only *.sqlite, or a store file.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="where to write report.html and the PNGs (default: RUN_DIR)")
    _common(p)

    p = sub.add_parser("_agent-host", help=argparse.SUPPRESS)  # internal: many agents in one process, for simulate
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--client-ids", required=True)
    p.add_argument("--slow-ids", default="", help="client ids made --slowdown times slower")
    p.add_argument("--broker-urls", default="", help="one broker URL per client id (each agent's link through fedge.netem)")
    p.add_argument("--slowdown", type=float, default=1.0)
    p.add_argument("--emulated-train-seconds", type=float, default=0.0)
    p.add_argument("--attacks", default="", help="TEST ONLY: ID=KIND,... (edge_agent/attack.py)")
    p.add_argument("--state-root", type=Path, required=True)
    p.add_argument("--synthetic", action="store_true", help="synthetic agents (fedge/simulate/synthetic.py)")
    p.add_argument("--downloads", choices=["host", "all"], default="host")
    p.add_argument("--ledger", type=Path, help="write what the agents published (synthetic) or downloaded here (JSON)")
    _task_flags(p)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_file, json=args.log_json)
    report_at_exit(args.command)
    handler = {
        "broker": _run_broker,
        "aggregator": _run_aggregator,
        "agent": _run_agent,
        "simulate": _run_simulate,
        "status": _run_status,
        "report": _run_report,
        "_agent-host": _run_agent_host,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        failure = storage_failure(exc, getattr(args, "store", None))  # a full, read-only or broken store (fedge/failures.py)
        if failure is None and not isinstance(exc, USER_ERRORS):
            raise  # a bug: keep its traceback
        log.debug("fatal", exc_info=True)
        print(f"fedge {args.command}: error: {failure or ' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return EXIT_STORAGE if failure else EXIT_USAGE


def _run_broker(args: argparse.Namespace) -> int:
    from broker import LocalBroker

    if args.action is not None:
        from fedge.broker_admin import run_broker_action

        return run_broker_action(args)

    async def serve() -> int:
        async with LocalBroker(port=args.port or 0, host=args.host or "127.0.0.1", data_dir=args.data_dir) as running:
            print(f"mosquitto listening on {running.url} (Ctrl-C stops)", flush=True)
            await asyncio.Event().wait()
        return 0

    return _run(serve())


def _run_aggregator(args: argparse.Namespace) -> int:
    from aggregator import Coordinator
    from fedge_runtime.allocator import keep_large_buffers

    config = aggregator_config(args)
    args.store = config.store  # the store as resolved (flag, FEDGE_STORE or the file): a failing one is named by it
    keep_large_buffers()
    return _run(Coordinator(config).run())


def aggregator_config(args: argparse.Namespace) -> Any:
    """The AggregatorConfig of `fedge aggregator`'s arguments (flags > FEDGE_* > --config FILE > defaults)."""
    from aggregator.config import build

    loader = aggregator_settings()
    return build(loader.gather(loader.flag_values(args), config_file=args.config))


def _run_agent(args: argparse.Namespace) -> int:
    from edge_agent import settings as agent_settings

    raw = agent_settings.gather(agent_settings.LOADER.flag_values(args), config_file=args.config)
    if args.action == "doctor":
        from edge_agent.doctor import run_doctor

        return run_doctor(raw, sys.stdout)
    settings = agent_settings.build(raw)
    return _run(_serve_agent(settings))


async def _serve_agent(settings: Any) -> None:
    from edge_agent import Agent
    from edge_agent.conditions import PolicyGate

    log.info("policy %s: %s", settings.preset, settings.policy.describe())
    async with PolicyGate(settings.policy, settings.probe(), sample_seconds=settings.sample_seconds) as gate:
        await Agent(settings.agent, gate=gate).run()


def _run_status(args: argparse.Namespace) -> int:
    from fedge.status import run_status
    from fedge_contract.mqtt import BrokerAddress

    address = configured(lambda: BrokerAddress.parse(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file))
    return _run(run_status(address, args.fleet, once=args.once))


def _run_report(args: argparse.Namespace) -> int:
    from fedge.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


def _run_agent_host(args: argparse.Namespace) -> int:
    if args.synthetic:
        from fedge.simulate.synthetic import HostOptions, host_synthetic_agents
        from fedge_contract.mqtt import BrokerAddress

        name = args.ledger.stem if args.ledger else "host"
        return _run(host_synthetic_agents(args.client_ids.split(","), BrokerAddress.parse(args.broker), args.fleet,
                                          HostOptions(downloads=args.downloads, seed=args.seed), name=name, ledger_path=args.ledger))
    from fedge.simulate.agent_host import host_agents

    return _run(host_agents(args))


def aggregator_settings() -> Any:
    """The aggregator's settings loader (aggregator/config.py), imported when a parser is built."""
    from aggregator.config import LOADER

    return LOADER


# What `fedge simulate` passes on to its aggregator: everything but what the simulation decides itself
# (the broker, store, fleet and task it runs; rounds, target, min and deadline, whose defaults follow --agents).
_SIMULATION_OWNS = frozenset({"broker", "ca_file", "cert_file", "key_file", "fleet", "task", "task_options", "store", "evaluate",
                              "rounds.rounds", "rounds.target", "rounds.min_updates", "rounds.deadline",
                              "ingest.max_update_bytes", "ingest.max_message_bytes", "ingest.durability"})


def _passed_to_aggregator(setting: Any) -> bool:
    return setting.key not in _SIMULATION_OWNS


def _aggregator_passthrough(args: argparse.Namespace) -> dict[str, Any]:
    """The aggregator settings given to `fedge simulate`, validated here (a bad one fails now, not in the child)."""
    from aggregator.config import build

    loader = aggregator_settings()
    given = {key: value for key, value in loader.flag_values(args).items() if key not in _SIMULATION_OWNS}
    build(loader.gather({**given, "broker": "mqtt://127.0.0.1:1883"}, environ={}))
    return given


def _run_simulate(args: argparse.Namespace) -> int:
    from fedge.simulate.runner import simulate

    options = simulation_options(args)
    dashboard_port, metrics_host = getattr(args, "monitoring.dashboard_port"), getattr(args, "monitoring.metrics_host")
    if dashboard_port is not None:
        host = metrics_host if metrics_host not in (None, "", "0.0.0.0") else "127.0.0.1"
        where = f"http://{host}:{dashboard_port}/" if int(dashboard_port) else "a free port (see logs/aggregator.log)"
        print(f"dashboard: {where}", flush=True)
    return _run(simulate(options))


def simulation_options(args: argparse.Namespace) -> Any:
    """The SimulationOptions of `fedge simulate`'s arguments; the aggregator settings among them are validated here."""
    from fedge.simulate.runner import SimulationOptions, default_agent_procs
    from fedge_tasks.base import parse_options

    passed = _aggregator_passthrough(args)
    passed.setdefault("rounds.seed", args.seed)  # the run's seed draws its cohorts too, unless --cohort-seed says otherwise
    training = {key.partition(".")[2]: passed.pop(key) for key in list(passed) if key.startswith("training.")}
    strategy = passed.pop("strategy.name", "fedavg")
    global_codec = passed.pop("global_codec", "none")
    workers = passed.pop("ingest.workers", None)
    options = configured(lambda: SimulationOptions(
        agents=args.agents,
        rounds=args.rounds,
        alpha=args.alpha,
        seed=args.seed,
        target=args.target,
        min_updates=args.min_updates,
        deadline=args.deadline,
        strategy=strategy,
        strategy_flags=aggregator_settings().argv(passed),
        attacks=dict(item.split("=", 1) for item in args.attack),
        global_codec=global_codec,
        training=training,
        stragglers=args.stragglers,
        slowdown=args.slowdown,
        emulated_train_seconds=args.emulated_train_seconds,
        chaos=chaos_options(args),
        out=args.out,
        store=args.store,
        agent_procs=args.agent_procs or default_agent_procs(args.agents, args.synthetic),
        quiet=args.quiet,
        log_level=args.log_level,
        log_json=args.log_json,
        synthetic=args.synthetic,
        params=args.params,
        downloads=args.downloads,
        workers=int(workers) if workers is not None else None,
        task_extra=parse_options(args.task_opt),
    ))
    return options

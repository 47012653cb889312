"""``fedge simulate`` for large fleets: how many host processes, and the options it gives the task."""

from __future__ import annotations

from pathlib import Path

from fedge.cli import build_parser, simulation_options
from fedge.simulate.runner import SimulationOptions, aggregator_argv, default_agent_procs


def test_ten_thousand_synthetic_agents_get_a_few_host_processes_by_default():
    assert default_agent_procs(10_000, True) == 4 and default_agent_procs(2_501, True) == 2 and default_agent_procs(20, True) == 1
    assert default_agent_procs(10_000, False) == 1  # trained agents share one torch in one process
    assert build_parser().parse_args(["simulate", "--hosts=3"]).agent_procs == 3
    assert build_parser().parse_args(["simulate"]).agent_procs is None  # then default_agent_procs decides
    assert simulation_options(build_parser().parse_args(["simulate", "--synthetic", "--agents=10000", "--target=200"])).agent_procs == 4


def test_extra_task_options_reach_the_aggregator_and_the_agents():
    args = build_parser().parse_args(["simulate", "--agents=100", "--task-opt=min_samples=5"])
    assert args.task_opt == ["min_samples=5"] and simulation_options(args).task_extra == {"min_samples": "5"}
    options = SimulationOptions(agents=100, task_extra={"min_samples": "5"})
    assert "--task-opt=min_samples=5" in aggregator_argv(options, "mqtt://127.0.0.1:1883", Path("s.sqlite"))
    assert "--task-opt=min_samples=5" in options.task_options() and "--task-opt=clients=100" in options.task_options()

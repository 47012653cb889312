"""What ``fedge simulate --synthetic`` asks of the aggregator and refuses up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.cli import aggregator_config, build_parser, simulation_options
from fedge.simulate.chaos import ChaosOptions
from fedge.simulate.runner import SimulationOptions, aggregator_argv


def test_synthetic_runs_the_synthetic_task_with_the_codec_and_workers_given():
    options = SimulationOptions(agents=100, synthetic=True, params=50_000, workers=2, training={"codec": "q8+zstd"}, agent_procs=4)
    config = aggregator_config(build_parser().parse_args(aggregator_argv(options, "mqtt://127.0.0.1:1883", Path("s.sqlite"))))
    assert (config.task, dict(config.task_options), config.training.codec, config.ingest.workers) == (
        "synthetic", {"params": "50000", "init_seed": "0"}, "q8+zstd", 2)
    assert (config.rounds.target, config.rounds.min_updates) == (100, 100)
    assert options.global_subscribers == 4  # downloads=host: one global model per host process
    assert SimulationOptions(agents=100, synthetic=True, downloads="all").global_subscribers == 100


def test_without_workers_the_aggregator_keeps_its_default():
    config = aggregator_config(build_parser().parse_args(aggregator_argv(SimulationOptions(synthetic=True), "mqtt://127.0.0.1:1883",
                                                                         Path("s.sqlite"))))
    assert config.ingest.workers == aggregator_config(build_parser().parse_args(["aggregator", "--broker=mqtt://h:1"])).ingest.workers


def test_the_cli_maps_the_synthetic_flags():
    options = simulation_options(build_parser().parse_args(["simulate", "--synthetic", "--agents=1000", "--params=1000000", "--hosts=4",
                                                            "--downloads=all", "--workers=2", "--codec=q8+zstd"]))
    assert (options.synthetic, options.agents, options.params, options.agent_procs, options.downloads, options.workers,
            options.training["codec"]) == (True, 1000, 1_000_000, 4, "all", 2, "q8+zstd")


@pytest.mark.parametrize("bad,match", [
    (dict(chaos=ChaosOptions(dropout=0.1)), "no faults"),
    (dict(stragglers=0.2), "no faults"),
    (dict(downloads="some"), "--downloads"),
    (dict(params=4), "--params"),
    (dict(workers=-1), "--workers"),
])
def test_refuses_what_a_load_test_cannot_mean(bad, match):
    with pytest.raises(ValueError, match=match):
        SimulationOptions(agents=10, synthetic=True, **bad)

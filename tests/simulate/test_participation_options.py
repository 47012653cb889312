"""``fedge simulate`` for large fleets: how many host processes, and the options it gives the task."""

from __future__ import annotations

from fedge.cli import build_parser
from fedge.simulate.runner import default_agent_procs


def test_ten_thousand_synthetic_agents_get_a_few_host_processes_by_default():
    assert default_agent_procs(10_000, True) == 4 and default_agent_procs(2_501, True) == 2 and default_agent_procs(20, True) == 1
    assert default_agent_procs(10_000, False) == 1  # trained agents share one torch in one process
    assert build_parser().parse_args(["simulate", "--hosts=3"]).agent_procs == 3
    assert build_parser().parse_args(["simulate"]).agent_procs is None  # then default_agent_procs decides

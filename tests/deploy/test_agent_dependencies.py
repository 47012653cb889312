"""An agent's install is fedge's base dependencies only: nothing an aggregator or a simulation needs.

deploy/pi/install.sh installs ``fedge`` without extras on the device. These tests fail if the
agent's code paths start importing a library that only an extra brings, or if the base grows one.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# import names of what the extras bring (aggregator, sim, dp), none of which a device installs
EXTRAS_ONLY = ["rich", "cryptography", "prometheus_client", "matplotlib", "sklearn", "opacus"]

AGENT_RUN = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on a device")
sys.meta_path.insert(0, Refuse())
from fedge.cli import build_parser
from edge_agent import settings
from edge_agent.agent import Agent
from edge_agent.doctor import run_doctor
from edge_agent import train_worker
from fedge_tasks.base import load_task
task = load_task("digits", {"clients": "2"})
model, data = task.build_model(), task.train_data("pi-1")
raw = settings.gather(settings.LOADER.flag_values(build_parser().parse_args(["agent", "--broker", "mqtts://hub:8884", "--client-id", "pi-1",
                      "--state-dir", "/tmp/x", "--cert-file", "/c.crt", "--key-file", "/c.key"])), environ={})
print(len(data), settings.build(raw).agent.broker.cert_file)
"""


def test_the_agents_code_imports_nothing_from_the_extras():
    code = f"BLOCKED = {EXTRAS_ONLY!r}\n" + AGENT_RUN
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    samples, cert = done.stdout.split()
    assert int(samples) > 0 and cert == "/c.crt"


def test_the_blocker_would_notice_an_extra_being_imported():
    code = "BLOCKED = ['numpy']\n" + AGENT_RUN  # numpy is needed: refusing it must fail the run
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert done.returncode != 0 and "not installed on a device" in done.stderr


def test_the_base_dependencies_leave_the_extras_out():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]}
    assert base.isdisjoint({"rich", "cryptography", "prometheus-client", "matplotlib", "scikit-learn", "opacus"})
    assert {"torch", "numpy", "aiomqtt", "psutil"} <= base
    extras = project["optional-dependencies"]
    assert any(spec.startswith("prometheus-client") for spec in extras["aggregator"])
    assert "fedge[aggregator]" in extras["sim"]


def test_an_aggregator_host_needs_only_the_aggregator_extra():
    blocked = ["matplotlib", "sklearn", "opacus"]  # [sim] and [dp]: not installed by `pip install 'fedge[aggregator]'`
    code = f"BLOCKED = {blocked!r}\n" + AGENT_RUN.split("from fedge.cli")[0] + """
import aggregator.coordinator, aggregator.workers.source, aggregator.workers.process, aggregator.observability.metrics
import fedge.status, fedge.broker_admin, broker.provision
from fedge_tasks.base import load_task
task = load_task("digits", {"clients": "2"})
print(len(task.eval_data()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 360

"""The systemd units pass `systemd-analyze verify` and carry the limits the issue asks for."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit as install.sh writes it: /opt/fedge rewritten to a prefix whose fedge exists."""
    fedge = Path(sys.executable).with_name("fedge")
    target = tmp_path / unit.name
    target.write_text(unit.read_text().replace("/opt/fedge/venv/bin/fedge", str(fedge)))
    return target


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is missing: scripts/bootstrap.sh installs Debian's systemd package")
@pytest.mark.parametrize("name", ["fedge-agent.service", "fedge-aggregator.service"])
def test_unit_verifies_cleanly(name, tmp_path):
    unit = installed_copy(UNITS / name, tmp_path)
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # verify only warns about unknown keys or bad values ("..., ignoring."): any line about our file is a defect
    assert [line for line in result.stderr.splitlines() if unit.name in line] == []


def test_verify_catches_a_broken_unit(tmp_path):
    if ANALYZE is None:
        pytest.skip("systemd-analyze is missing")
    unit = installed_copy(UNITS / "fedge-agent.service", tmp_path)
    unit.write_text(unit.read_text().replace("Nice=10", "Nicee=10"))
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in result.stderr  # the check above can fail


def parse(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep systemd's CamelCase keys
    parser.read(UNITS / name)
    return parser


def test_agent_unit_limits():
    service = parse("fedge-agent.service")["Service"]
    assert service["Restart"] == "always" and service["StateDirectory"] == "fedge-agent"
    assert int(service["Nice"]) >= 10
    assert service["CPUQuota"].endswith("%") and service["MemoryMax"].endswith("M")
    assert "fedge agent --config /etc/fedge/agent.toml" in service["ExecStart"]


def test_aggregator_unit_keeps_its_store_in_the_state_directory():
    service = parse("fedge-aggregator.service")["Service"]
    assert service["StateDirectory"] == "fedge-aggregator"
    assert "--store /var/lib/fedge-aggregator/" in service["ExecStart"]


def test_aggregator_unit_restarts_after_a_failure_but_not_after_its_last_round_or_bad_flags():
    """Issue 19: a store it could not use ends it with exit code 74 (fedge/failures.py): systemd restarts it,
    without a tight loop and not forever; exit 0 (its rounds are done) and 2 (bad flags) are not restarted."""
    from fedge.failures import EXIT_INTERRUPTED, EXIT_STORAGE, EXIT_USAGE

    unit = parse("fedge-aggregator.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert 5 <= int(service["RestartSec"]) <= 60
    assert service["RestartPreventExitStatus"].split() == [str(EXIT_USAGE)] and str(EXIT_STORAGE) not in service["RestartPreventExitStatus"]
    assert service["SuccessExitStatus"].split() == [str(EXIT_INTERRUPTED)]  # systemctl stop: SIGTERM, exit 130
    assert unit["Unit"]["StartLimitIntervalSec"] == "10min" and int(unit["Unit"]["StartLimitBurst"]) * int(service["RestartSec"]) <= 600

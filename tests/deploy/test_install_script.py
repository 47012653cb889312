"""deploy/pi/install.sh end to end in a temporary prefix (--no-systemd), then the installed agent's doctor.

The machine cannot download torch here, so the test gives the new venv this test environment's
packages through a .pth line and runs the script in its offline mode (--wheelhouse, no index):
every step of the script runs (venv, torch first, fedge from a copy of the checkout, config),
and pip finds torch and the dependencies already satisfied instead of downloading them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "pi" / "install.sh"
pytestmark = pytest.mark.integration


def checkout_copy(dest: Path) -> Path:
    """What a user would have on the Pi: the repository (a copy, so pip's build stays out of ours)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", "tests")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def prepared_venv(prefix: Path) -> None:
    base = Path(sys._base_executable)  # the interpreter behind this venv
    # without its own pip/setuptools: the shared ones (newer, as torch requires) come through the .pth
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(prefix / "venv")], check=True)
    site = next((prefix / "venv" / "lib").glob("python3*/site-packages"))
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


async def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 240) -> tuple[int, str]:
    # cwd "/": nothing from this checkout may sneak onto the installed program's sys.path
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd="/")
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


@pytest.mark.timeout(400)
async def test_install_in_a_prefix_then_doctor(broker, tmp_path):
    prefix = tmp_path / "opt-fedge"
    source = checkout_copy(tmp_path / "checkout")
    prepared_venv(prefix)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    args = ["bash", str(source / "deploy" / "pi" / "install.sh"), "--prefix", str(prefix), "--no-systemd",
            "--broker", broker.url, "--client-id", "pi-4", "--wheelhouse", str(wheels), "--python", sys._base_executable]
    code, out = await run(*args)
    assert code == 0, out
    assert f"installed in {prefix}" in out

    config = (prefix / "etc" / "agent.toml").read_text()
    assert f'broker = "{broker.url}"' in config and 'client_id = "pi-4"' in config and 'preset = "pi"' in config
    python = prefix / "venv" / "bin" / "python"
    code, where = await run(str(python), "-c", "import edge_agent, fedge; print(edge_agent.__file__)")
    assert code == 0 and where.startswith(str(prefix)), where  # fedge itself lives in the new venv

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    env["FEDGE_POLICY_MAX_CPU_LOAD"] = "none"  # a shared test machine is busy; not what this test checks
    code, out = await run(str(prefix / "venv" / "bin" / "fedge"), "agent", "doctor", "--config", str(prefix / "etc" / "agent.toml"), env=env)
    assert code == 0, out
    assert "reachable" in out and "policy       pi:" in out and (prefix / "state").is_dir()

    # re-running upgrades in place and keeps the user's config
    (prefix / "etc" / "agent.toml").write_text(config + "\n# edited by the user\n")
    code, out = await run(*args)
    assert code == 0, out
    assert "# edited by the user" in (prefix / "etc" / "agent.toml").read_text()


async def test_first_install_needs_a_broker(tmp_path):
    code, out = await run("bash", str(SCRIPT), "--prefix", str(tmp_path / "p"), "--no-systemd", "--bogus")
    assert code != 0 and "unknown option --bogus" in out


@pytest.mark.timeout(400)
async def test_install_with_a_device_certificate_copies_it_and_points_the_config_at_it(tmp_path):
    from edge_agent import settings

    prefix = tmp_path / "opt-fedge"
    source = checkout_copy(tmp_path / "checkout")
    prepared_venv(prefix)
    (tmp_path / "wheels").mkdir()
    device = tmp_path / "from-add-device"
    device.mkdir()
    for name in ("ca.crt", "pi-4.crt", "pi-4.key"):
        (device / name).write_text(f"{name}\n")
    args = ["bash", str(source / "deploy" / "pi" / "install.sh"), "--prefix", str(prefix), "--no-systemd",
            "--broker", "mqtts://hub.local:8884", "--client-id", "pi-4", "--wheelhouse", str(tmp_path / "wheels"),
            "--python", sys._base_executable, "--ca-file", str(device / "ca.crt"), "--cert-file", str(device / "pi-4.crt"),
            "--key-file", str(device / "pi-4.key")]
    code, out = await run(*args)
    assert code == 0, out
    etc = prefix / "etc"
    assert (etc / "pi-4.key").read_text() == "pi-4.key\n" and (etc / "pi-4.key").stat().st_mode & 0o077 == 0
    broker = settings.load({}, config_file=etc / "agent.toml", environ={}).agent.broker
    assert (broker.tls, broker.ca_file, broker.cert_file, broker.key_file) == (
        True, str(etc / "ca.crt"), str(etc / "pi-4.crt"), str(etc / "pi-4.key"))
    code, out = await run("bash", str(SCRIPT), "--prefix", str(prefix), "--no-systemd", "--key-file", str(device / "pi-4.key"))
    assert code != 0 and "--key-file needs --cert-file" in out

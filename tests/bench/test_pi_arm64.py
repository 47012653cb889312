"""The arm64 check's pure parts, and that it skips cleanly where it cannot run (the run itself is `make pi-check`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pi_arm64 import check, prereqs, sizes
from bench.pi_arm64.emulation import FLOAT32_PROBE, FLOAT32_TOLERANCE, PI_CPUS, PSUTIL_SHIM, fake_cpu_tree, write_psutil_shim
from bench.pi_arm64.userland import Mount, enter_command, standard_mounts

REPO = Path(__file__).resolve().parents[2]


def everything(**overrides):
    settings = {"is_root": True, "platform": "linux", "which": lambda name: f"/usr/bin/{name}", "has_mosquitto": lambda: True,
                "is_reachable": lambda host, port: True, "binfmt": lambda: None}
    settings.update(overrides)
    return prereqs.missing(**settings)


def test_nothing_missing_means_it_runs():
    assert everything() == []


def test_each_missing_prerequisite_says_what_to_do():
    assert "needs root" in everything(is_root=False)[0]
    assert "needs Linux" in everything(platform="darwin")[0]
    [tools] = everything(which=lambda name: None if name in ("debootstrap", "qemu-aarch64-static") else "/bin/x")
    assert tools == "missing Debian package(s): apt-get install debootstrap qemu-user-static"
    assert "apt-get install mosquitto" in everything(has_mosquitto=lambda: False)[0]
    offline = everything(is_reachable=lambda host, port: host != "pypi.org")
    assert offline == ["no network to PyPI (pypi.org:443): debootstrap, apt-get and pip need it"]
    assert everything(binfmt=lambda: "binfmt_misc is not mounted") == ["binfmt_misc is not mounted"]


def test_binfmt_handler_states(tmp_path):
    assert prereqs.handler_state(tmp_path) == "binfmt_misc is not mounted"
    (tmp_path / "status").write_text("enabled\n")
    assert "no qemu-aarch64 binfmt handler" in str(prereqs.handler_state(tmp_path))
    handler = tmp_path / "qemu-aarch64"
    handler.write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: P\n")
    assert "lacks the F flag" in str(prereqs.handler_state(tmp_path))
    handler.write_text("disabled\nflags: PF\n")
    assert "disabled" in str(prereqs.handler_state(tmp_path))
    handler.write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n")
    assert prereqs.handler_state(tmp_path) is None


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]  # root dropping to an unprivileged user


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop to another user")
def test_without_root_it_skips_with_a_reason_and_exit_0(tmp_path):
    if subprocess.run([*NOBODY, "test", "-r", str(REPO / "bench" / "pi_arm64" / "__init__.py")], check=False).returncode != 0:
        pytest.skip(f"an unprivileged user cannot read this checkout ({REPO}: a parent folder is private, as `mktemp -d` makes it)")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FEDGE_PI_CHECK_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([*NOBODY, sys.executable, "-m", "bench.pi_arm64"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "needs root" in report["skipped"] and any("debootstrap" in need for need in report["needs"])
    assert not (tmp_path / "cache").exists()  # it touched nothing


def test_a_missing_prerequisite_skips_before_touching_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prereqs, "missing", lambda: ["no network to PyPI (pypi.org:443)"])
    monkeypatch.setattr(prereqs, "enable_binfmt", lambda: None)
    assert check.main(["--cache", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == "no network to PyPI (pypi.org:443)"
    assert not (tmp_path / "cache").exists()


def test_the_fake_cpu_tree_is_a_pi4s(tmp_path):
    tree = fake_cpu_tree(tmp_path / "cpu", 4)
    assert (tree / "possible").read_text() == "0-3\n"
    assert (tree / "cpu3" / "regs" / "identification" / "midr_el1").read_text() == "0x00000000410fd083\n"
    assert not (tree / "cpu4").exists()
    assert (fake_cpu_tree(tmp_path / "one", 1) / "online").read_text() == "0\n"
    with pytest.raises(ValueError):
        fake_cpu_tree(tmp_path / "none", 0)


def test_the_psutil_shim_only_disarms_the_pid_reuse_check(tmp_path):
    folder = write_psutil_shim(tmp_path / "shim")
    assert (folder / "sitecustomize.py").read_text() == PSUTIL_SHIM
    code = "import psutil; psutil.Process()._raise_if_pid_reused(); print(psutil.Process().children() == [])"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(folder)}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.stdout.strip() == "True", done.stderr


def test_distribution_sizes_count_record_sizes_and_measure_the_rest(tmp_path):
    site = tmp_path / "site-packages"
    (site / "demo").mkdir(parents=True)
    (site / "demo" / "__init__.py").write_text("x" * 100)
    (site / "demo" / "__pycache__").mkdir()
    (site / "demo" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0" * 30)
    info = site / "Demo_Pkg-1.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("demo/__init__.py,sha256=abc,100\ndemo/__pycache__/__init__.cpython-311.pyc,,\n"
                                 "Demo_Pkg-1.0.dist-info/RECORD,,\ndemo/gone.py,sha256=x,\n")
    record = (info / "RECORD").stat().st_size
    assert sizes.distribution_sizes(site) == {"demo-pkg": 100 + 30 + record}


def test_entering_the_tree_mounts_in_a_private_namespace_then_chroots():
    argv = enter_command(Path("/cache/root"), ["fedge", "agent", "--client-id", "pi 0"], env={"PIP_CERT": "/b.crt"},
                         mounts=[*standard_mounts(), Mount("/sys/devices/system/cpu", "/cache/cpu")], cwd="/home/pi")
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    script = argv[7]
    assert "mount -t proc proc /cache/root/proc" in script and "mount -t sysfs -o ro sysfs /cache/root/sys" in script
    assert "mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /cache/root/dev/pts" in script
    assert script.index("/cache/root/sys ") < script.index("mount --bind /cache/cpu /cache/root/sys/devices/system/cpu")
    assert 'exec chroot /cache/root "$@"' in script
    assert argv[-4:] == ["fedge", "agent", "--client-id", "pi 0"]  # arguments are passed, never re-split
    assert "PIP_CERT=/b.crt" in argv and "HOME=/root" in argv and "/usr/bin/env" in argv


def test_errors_come_from_exit_codes_receipts_and_logs(tmp_path):
    log = tmp_path / "agent.log"
    log.write_text("INFO fine\nTraceback (most recent call last):\npsutil.NoSuchProcess: gone\n2026 ERROR fedge.agent boom\n")
    result = {"install_exit_code": 0, "training": {
        "agents": [{"client_id": "pi-0", "exit_code": 2, "log": str(log)}],
        "updates_accepted": 5, "updates_expected": 6,
        "receipts_not_accepted": [{"round": 2, "client_id": "pi-0", "status": "rejected", "reason": "non_finite"}],
    }}
    errors = check.errors_in(result)
    assert errors[0] == "pi-0 exited 2"
    assert "pi-0: Traceback (most recent call last):" in errors and "pi-0: 2026 ERROR fedge.agent boom" in errors
    assert "5 of 6 updates accepted" in errors and any("non_finite" in e for e in errors)
    assert check.errors_in({"install_exit_code": 1, "install_log": "/x"}) == ["install.sh exited 1: see /x"]


def test_torchs_stack_follows_the_extras_it_asks_for(tmp_path):
    site = tmp_path / "site-packages"

    def dist(name: str, *requires: str) -> None:
        info = site / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
        (info / "RECORD").write_text("")

    dist("torch", "filelock", "cuda-toolkit[cublas]==13.0; platform_system == \"Linux\"", "pyyaml; extra == \"pyyaml\"")
    dist("cuda-toolkit", "nvidia-cublas; extra == \"cublas\"", "nvidia-cufft; extra == 'cufft'")
    for name in ("filelock", "nvidia-cublas", "nvidia-cufft", "pyyaml", "fedge"):
        dist(name)
    needs = sizes.requirements(site)
    assert sizes.closure(needs, "torch") == {"torch", "filelock", "cuda-toolkit", "nvidia-cublas"}
    assert sizes.closure(needs, "cuda-toolkit", frozenset({"cufft"})) == {"cuda-toolkit", "nvidia-cufft"}


def test_unknown_readings_are_reported_apart_from_errors(tmp_path):
    log = tmp_path / "agent.log"
    log.write_text("2026 INFO fedge.agent fine\n"
                   "2026 WARNING fedge.probes cannot read the device's cpu_load (NoSuchProcess: gone): treating it as unknown until it reads again\n")
    assert check.unknown_readings(log) == [
        "fedge.probes cannot read the device's cpu_load (NoSuchProcess: gone): treating it as unknown until it reads again"]
    assert check.log_errors(log) == [] and check.unknown_readings(tmp_path / "missing.log") == []


def test_the_float32_probe_measures_products_against_float64():
    """The probe the check runs in the tree, run here natively: a small error, printed as one float."""
    for threads in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", FLOAT32_PROBE, threads], capture_output=True, text=True, timeout=120, check=True)
        assert 0.0 < float(done.stdout) < FLOAT32_TOLERANCE / 10


def test_a_wrong_float32_product_on_the_agents_one_thread_is_an_error():
    assert check.errors_in({"float32_max_error": {"threads_1": 5e-7, "threads_2": "the probe exited -4: SIGILL"}}) == []
    assert check.errors_in({"float32_max_error": {"threads_1": 0.65}})[0].startswith(
        "float32 products in the tree's torch on one thread: 0.65")
    assert "the probe exited 1" in check.errors_in({"float32_max_error": {"threads_1": "the probe exited 1: boom"}})[0]


def test_each_pi_is_emulated_as_its_own_core(tmp_path):
    options = check.Options(cache=tmp_path, pi="5")
    assert options.env()["QEMU_CPU"] == "cortex-a76" and options.env()["PIP_CERT"]
    assert check.Options(cache=tmp_path).env()["QEMU_CPU"] == "cortex-a72"
    tree = fake_cpu_tree(tmp_path / "cpu", 2, midr=PI_CPUS["5"].midr)
    assert (tree / "cpu1" / "regs" / "identification" / "midr_el1").read_text() == "0x00000000414fd0b1\n"


def test_the_summary_splits_torchs_stack_from_what_fedge_adds(tmp_path):
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    for name, size, requires in (("torch", 3 * 2**20, ["filelock"]), ("filelock", 2**20, []), ("fedge", 2**20, ["numpy", "torch"]),
                                 ("numpy", 2 * 2**20, []), ("pip", 2**20, [])):
        (site / name).mkdir(parents=True)
        (site / name / "blob").write_bytes(b"\0" * size)
        info = site / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
        (info / "RECORD").write_text(f"{name}/blob,sha256=x,{size}\n")
    summary = sizes.summary(tmp_path / "venv")
    assert summary["torch_stack"] == ["filelock", "torch"] and summary["torch_stack_mib"] == 4.0
    assert summary["fedge_without_torch_stack"] == {"numpy": 2.0, "fedge": 1.0} and summary["fedge_without_torch_stack_mib"] == 3.0
    assert summary["venv_mib"] == 8.0  # every file on disk, pip included (the metadata rounds away)


def test_each_run_starts_with_an_empty_broker_and_logs(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "broker").mkdir(parents=True)
    (run_dir / "broker" / "mosquitto.db").write_bytes(b"retained: finished at v3")  # what broke the second run
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "agent-pi-0.log").write_text("old")
    (run_dir / "rootfs").mkdir()
    logs, broker = check.fresh_run_folders(run_dir)
    assert (logs, broker) == (run_dir / "logs", run_dir / "broker")
    assert list(logs.iterdir()) == [] and list(broker.iterdir()) == [] and (run_dir / "rootfs").is_dir()
    assert check.fresh_run_folders(tmp_path / "first") == (tmp_path / "first" / "logs", tmp_path / "first" / "broker")


def test_the_aggregator_runs_as_the_fedge_command_with_flags_it_accepts(tmp_path):
    """The check starts `fedge aggregator` (not the aggregator's classes): its flags must parse."""
    from fedge.cli import build_parser

    argv = check.aggregator_argv(check.Options(cache=tmp_path, agents=2, rounds=3), "mqtt://127.0.0.1:1883", tmp_path)
    assert argv[:4] == [sys.executable, "-m", "fedge", "aggregator"]
    parsed = {name.rsplit(".", 1)[-1]: value for name, value in vars(build_parser().parse_args(argv[3:])).items()}  # "rounds.target" -> "target"
    assert [str(parsed[name]) for name in ("rounds", "target", "min_updates", "fleet")] == ["3", "2", "2", check.FLEET]


def test_an_aggregator_that_fails_or_rounds_that_never_close_are_errors():
    training = {"agents": [], "updates_accepted": 6, "updates_expected": 6, "rounds_closed": 2, "rounds_expected": 3,
                "aggregator_exit_code": 2, "aggregator_log": "/run/aggregator.log"}
    assert check.errors_in({"training": training}) == ["fedge aggregator exited 2: see /run/aggregator.log", "2 of 3 rounds closed"]
    assert check.errors_in({"training": {**training, "rounds_closed": 3, "aggregator_exit_code": 0}}) == []

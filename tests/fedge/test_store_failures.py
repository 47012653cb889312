"""Issue 19: a full or read-only store ends the aggregator with one clear line and exit code 74.

A real ``fedge aggregator`` process on a real Mosquitto, its store made unusable two ways that
work for any user, root included (root ignores file modes, so it runs the aggregator without the
capabilities that let it):
- read-only: an existing store whose file and folder are read-only (a disk remounted read-only);
- full: the process may write no file beyond 64 KiB (RLIMIT_FSIZE; SIGXFSZ ignored, so a write
  past it fails with EFBIG as one past a full disk fails with ENOSPC).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedge.failures import EXIT_STORAGE
from tests.integration.faults import _env, task_flags

pytestmark = pytest.mark.integration

# Root passes every file-mode check (CAP_DAC_OVERRIDE): run the aggregator without those capabilities.
_DAC = "-dac_override,-dac_read_search,-fowner"
WITHOUT_ROOT_FILE_ACCESS = ["setpriv", f"--inh-caps={_DAC}", f"--bounding-set={_DAC}", "--"] if os.geteuid() == 0 else []


def run_aggregator(broker_url: str, fleet: str, store: Path, *, file_size_limit: int | None = None,
                   store_flag: bool = True) -> subprocess.CompletedProcess[str]:
    def limit_file_size() -> None:
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec: the write fails (EFBIG) instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [*WITHOUT_ROOT_FILE_ACCESS, sys.executable, "-m", "fedge", "aggregator", f"--broker={broker_url}", f"--fleet={fleet}",
               *([f"--store={store}"] if store_flag else []), "--rounds=1", "--no-eval", *task_flags()]
    env = _env() if store_flag else {**_env(), "FEDGE_STORE": str(store)}
    return subprocess.run(command, capture_output=True, text=True, timeout=90, env=env, preexec_fn=limit_file_size,
                          stdin=subprocess.DEVNULL, check=False)


@contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in paths}
    for path in paths:
        path.chmod(modes[path] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    return lines[-1]


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv (util-linux) ignores file modes")
def test_a_read_only_store_ends_the_aggregator_with_one_line_and_exit_74(broker, fleet, tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    store = folder / "agg.sqlite"
    with sqlite3.connect(store) as db:  # an existing store, as a disk remounted read-only leaves it
        db.execute("CREATE TABLE kept (x)")
    with read_only(store, folder):
        result = run_aggregator(broker.url, fleet, store)
    assert result.returncode == EXIT_STORAGE, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("fedge aggregator: error: the store ") and str(store) in line
    assert "read-only" in line and "writable" in line  # what happened, and what to do


def test_a_full_disk_ends_the_aggregator_with_one_line_and_exit_74(broker, fleet, tmp_path):
    store = tmp_path / "agg.sqlite"
    result = run_aggregator(broker.url, fleet, store, file_size_limit=64 * 1024, store_flag=False)  # FEDGE_STORE names it
    assert result.returncode == EXIT_STORAGE, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("fedge aggregator: error: the store ") and str(store) in line
    assert "full" in line and "free space" in line

"""Peak resident memory of this process, written at exit when a parent asks for it.

``fedge simulate`` sets FEDGE_PEAK_RSS_FILE for its children so it can add up the peaks of all
its processes (an upper bound of their combined peak) without sampling.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path

ENV = "FEDGE_PEAK_RSS_FILE"


def peak_rss_mib() -> float:
    """This process's own peak RSS.

    VmHWM belongs to the address space created at exec. ``ru_maxrss`` would be wrong here: Linux
    carries it across exec, and a child spawned through vfork even inherits its parent's
    high-water mark (a simulation started from a test runner would report the runner's peak).
    """
    own = proc_peak_rss_mib(os.getpid())
    if own is not None:
        return own
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS and others: bytes on darwin
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def proc_peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a live process (Linux), e.g. the broker before it is stopped."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def report_at_exit(name: str) -> None:
    target = os.environ.get(ENV)
    if target:
        atexit.register(lambda: Path(target).write_text(json.dumps({"process": name, "peak_rss_mib": peak_rss_mib()})))

"""Peak memory per process must be the process's own, not inherited from whoever spawned it."""

from __future__ import annotations

import subprocess
import sys

from fedge.peak_memory import peak_rss_mib

CHILD = "from fedge.peak_memory import peak_rss_mib; print(peak_rss_mib())"


def test_a_child_does_not_inherit_its_parents_peak():
    ballast = bytearray(300 * 2**20)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # touch every page: the parent really holds 300 MiB
    assert peak_rss_mib() > 300
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    # a bare interpreter importing one small module: a few tens of MiB, whatever the parent holds
    assert float(child.stdout) < 100, child.stdout
    del ballast

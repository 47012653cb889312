"""fedge_runtime.allocator: the aggregator's processes keep large freed buffers; a user's own tuning wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fedge_runtime.allocator import user_tuned

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

# Prints how many bytes of an 8 MiB buffer glibc served from a fresh mmap (mallinfo2's hblkhd
# grows by it) rather than from the heap, and whether keep_large_buffers applied its settings.
PROBE = """
import ctypes, sys
from fedge_runtime.allocator import keep_large_buffers
applied = keep_large_buffers() if sys.argv[1] == "keep" else None
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
buffer = bytearray(8 * 2**20)
print(applied, libc.mallinfo2().hblkhd - before)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={**clean, **env})
    applied, mapped = done.stdout.split()
    return applied, int(mapped)


@glibc_only
def test_large_buffers_come_from_the_heap_once_applied() -> None:
    assert probe("default") == ("None", 8 * 2**20 + 4096)  # glibc's default: one fresh mapping (plus its header page)
    assert probe("keep") == ("True", 0)


@glibc_only
def test_the_users_own_tuning_is_kept() -> None:
    applied, mapped = probe("keep", MALLOC_MMAP_THRESHOLD_=str(2**20))
    assert (applied, mapped) == ("False", 8 * 2**20 + 4096)


def test_user_tuned_reads_both_ways_of_setting_a_threshold() -> None:
    assert not user_tuned({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512", "MALLOC_ARENA_MAX": "2"})
    assert user_tuned({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})
    assert user_tuned({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=65536"})
    assert user_tuned({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert user_tuned({"MALLOC_MMAP_THRESHOLD_": "65536"})

"""glibc's allocator, told to keep the large buffers an aggregator frees for the next update.

Each update an aggregator takes in allocates the same few large buffers and frees them again:
the payload (0.1-4 MB, copied by paho), the decoded float32 tensors (4 MB for 1M parameters),
the codec's temporaries. glibc serves a block above its mmap threshold (128 KiB at start, raised
only by some frees) with a fresh mmap and unmaps it when freed, and trims the top of the heap
once more than twice that is free: the next update's buffers then page-fault in again, page by
page. On these VMs a fault is expensive. Measured here (no network, 1M parameters, q8+zstd):
decode + fold 4.7 ms per update with the defaults, 2.3-2.7 ms with the settings below; the whole
ingest path 6.2-6.9 ms against 3.7-4.2 ms. Through Mosquitto, one ingest worker took 1M-parameter
updates 1.3-1.6x faster (bench/ingest.py).

The cost: up to TRIM_THRESHOLD of freed memory stays with the process instead of going back to
the kernel, which the aggregator, sized for its model, can afford; an agent on a device can not,
so only the aggregator and its workers call ``keep_large_buffers``. A user who chose either
threshold (GLIBC_TUNABLES, or MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_) keeps their settings.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

log = logging.getLogger("fedge.allocator")

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit: smaller blocks come from the heap
TRIM_THRESHOLD = 128 * 2**20  # free memory kept at the top of the heap before it is given back
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def user_tuned(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the user already chose either threshold, through either of glibc's environment interfaces."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(f"glibc.malloc.{knob}_threshold" in tunables or f"MALLOC_{knob.upper()}_THRESHOLD_" in environ for knob in ("mmap", "trim"))


def keep_large_buffers() -> bool:
    """Apply MMAP_THRESHOLD and TRIM_THRESHOLD to this process; whether they were applied.

    Not applied where the C library is not glibc (musl, macOS), or when the user tuned it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_tuned():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not applied:
        log.warning("mallopt refused the aggregator's allocator settings; large updates will page-fault more")
    return applied

"""Process limits a large simulated fleet runs into."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("fedge.simulate")


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft open-files limit to at least ``needed`` (at most the hard limit).

    Each simulated agent holds one socket, and Mosquitto one per agent; a common soft limit of
    1024 would refuse connections from the thousandth agent on. Children inherit the new limit
    (so a broker started afterwards gets it too). Returns the soft limit in effect.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
        if soft < needed:
            log.warning("open files limited to %d (hard limit) but %d are needed: raise it with ulimit -Hn", soft, needed)
    return soft

"""Raising the open-files limit a thousand simulated agents need."""

from __future__ import annotations

import resource

from fedge.simulate.limits import raise_fd_limit


def test_raises_the_soft_limit_up_to_the_hard_one_and_never_lowers_it():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_fd_limit(300) == 300 == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_fd_limit(100) == 300  # already enough: unchanged
        if hard != resource.RLIM_INFINITY:
            assert raise_fd_limit(hard + 1) == hard  # capped by the hard limit, with a warning
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

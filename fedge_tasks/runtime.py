"""Process-wide torch settings that fedge programs apply once at start."""

from __future__ import annotations


def limit_torch_threads(threads: int = 1) -> None:
    """Small models train and fold fastest on one thread; OMP's pool spins for ms per call on 2 cores."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set once in this process
        pass

"""A digits task that records every training batch and can hold one batch until the test releases it.

``fifo``: at the ``block_at``-th batch of the first training only (``marker`` records that it
happened, across processes), the loss opens the named pipe for reading, which blocks until the
test opens it for writing (so the test knows training is mid-way), then reads until the test
closes it. ``calls``: one line appended per batch, so the test counts batches per attempt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedge_tasks.digits import DigitsTask


@dataclass(frozen=True)
class BlockingDigits(DigitsTask):
    fifo: str = ""
    marker: str = ""
    calls: str = ""
    block_at: int = 3

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with open(self.calls, "a") as log:
            log.write(f"{os.getpid()}\n")
        with open(self.calls) as log:
            count = sum(1 for _ in log)
        if count == self.block_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            with open(self.fifo, "rb") as pipe:  # blocks until the test opens the other end
                pipe.read()  # until the test closes it
        return F.cross_entropy(outputs, targets)

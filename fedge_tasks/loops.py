"""Default local training and evaluation loops for classification-style tasks.

They are deliberately plain (SGD, cross-entropy) and deterministic: a per-call torch Generator
drives shuffling, so agents training in parallel threads never share random state. Training
checks ``should_continue`` between batches so a device that stops being eligible (unplugged,
hot, busy) stops cleanly without a half-applied step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0  # FedProx proximal weight; 0 = plain FedAvg local training
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    num_samples: int  # samples in the local dataset (FedAvg's weight)
    loss: float  # mean training loss over the batches run
    accuracy: float  # training accuracy over the batches run
    seconds: float
    batches: int
    completed: bool  # False when should_continue stopped it early


def _batches(dataset: Dataset, batch_size: int, generator: torch.Generator) -> Any:
    if isinstance(dataset, TensorDataset):  # fast path: index tensors directly, no DataLoader overhead
        n = len(dataset)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield tuple(t[idx] for t in dataset.tensors)
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


class _SGD:
    """SGD with momentum and weight decay, exactly torch.optim.SGD's update rule.

    torch.optim's first use imports torch._dynamo: ~1.2 s and ~73 MiB of resident memory on
    every device, for a few lines of arithmetic. Tests check equality with torch.optim.SGD.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float) -> None:
        self.params = params
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss,
    should_continue: Callable[[], bool] = lambda: True,
) -> TrainResult:
    """Train ``model`` in place on ``dataset``."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = _SGD(list(model.parameters()), settings.lr, settings.momentum, settings.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if settings.mu > 0 else []
    model.train()
    total_loss, correct, seen, batches, completed = 0.0, 0, 0, 0, True
    for _ in range(settings.epochs):
        for inputs, targets in _batches(dataset, settings.batch_size, generator):
            if not should_continue():
                completed = False
                break
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            if anchor:
                loss = loss + settings.mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(targets)
            if outputs.dim() == 2:
                correct += int((outputs.argmax(1) == targets).sum())
            seen += len(targets)
            batches += 1
        if not completed:
            break
    return TrainResult(
        num_samples=len(cast(Sized, dataset)),  # map-style datasets have a length; torch's Dataset leaves __len__ to subclasses
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        seconds=time.perf_counter() - start,
        batches=batches,
        completed=completed,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``dataset``."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    batches = _chunks(dataset, batch_size) if isinstance(dataset, TensorDataset) else DataLoader(dataset, batch_size=batch_size)
    for inputs, targets in batches:
        outputs = model(inputs)
        total_loss += float(loss_fn(outputs, targets)) * len(targets)
        correct += int((outputs.argmax(1) == targets).sum())
        seen += len(targets)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "num_samples": float(seen)}


def _chunks(dataset: TensorDataset, batch_size: int) -> Any:
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield tuple(t[start : start + batch_size] for t in dataset.tensors)

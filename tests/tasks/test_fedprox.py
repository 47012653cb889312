"""FedProx's proximal term: training with mu must follow grad(loss) + mu * (w - w_global).

The reference computes that gradient in closed form, independently of loops.train (which
differentiates the proximal loss with autograd), and runs the same SGD steps by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from fedge_tasks.loops import TrainSettings, train


def make_model_and_data() -> tuple[torch.nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    return model, data


def reference(model: torch.nn.Module, data: TensorDataset, mu: float, lr: float, steps: int) -> list[torch.Tensor]:
    """Full-batch gradient descent with the closed-form proximal gradient mu * (w - w0)."""
    anchor = [p.detach().clone() for p in model.parameters()]
    inputs, targets = data.tensors
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        with torch.no_grad():
            for p, a in zip(model.parameters(), anchor, strict=True):
                p -= lr * (p.grad + mu * (p - a))
    return [p.detach().clone() for p in model.parameters()]


def trained(mu: float, steps: int) -> list[torch.Tensor]:
    model, data = make_model_and_data()
    # one batch per epoch (batch_size = dataset size): the shuffle cannot change the gradient
    train(model, data, TrainSettings(epochs=steps, batch_size=len(data), lr=0.5, mu=mu, seed=1))
    return [p.detach().clone() for p in model.parameters()]


def test_proximal_gradient_matches_the_closed_form() -> None:
    for mu in (0.0, 0.1, 1.0):
        model, data = make_model_and_data()
        expected = reference(model, data, mu, lr=0.5, steps=5)
        for got, want in zip(trained(mu, steps=5), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_proximal_term_pulls_towards_the_global_model() -> None:
    model, _ = make_model_and_data()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    distance = {mu: float((torch.cat([p.flatten() for p in trained(mu, steps=5)]) - start).norm()) for mu in (0.0, 1.0)}
    assert distance[1.0] < distance[0.0]

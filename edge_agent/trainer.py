"""Local training of one global model version, run in a worker thread.

The event loop keeps the MQTT connection alive (keepalives, receipts) while this runs; the only
thing shared with it is ``should_continue``, read between batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.errors import FingerprintMismatch
from edge_agent.seeds import training_seed
from fedge_contract import DecodeError, GlobalModel
from fedge_contract.codecs import decode_weights
from fedge_contract.tensors import ModelSpec
from fedge_tasks import Task, TrainResult, TrainSettings, train
from fedge_tasks.weights import get_weights, set_weights

__all__ = ["FingerprintMismatch", "LocalTrainer", "LocalUpdate", "training_seed"]


@dataclass(frozen=True)
class LocalUpdate:
    delta: dict[str, np.ndarray]  # local - global, float32
    result: TrainResult


class LocalTrainer:
    def __init__(self, task: Task, client_id: str, seed: int) -> None:
        self.client_id = client_id
        self.seed = seed
        self.model = task.build_model()
        self.data = task.train_data(client_id)
        self.loss = getattr(task, "loss", None)
        self.spec = ModelSpec.of(get_weights(self.model))

    def check(self, model: GlobalModel) -> None:
        if model.fingerprint != self.spec.fingerprint:
            raise FingerprintMismatch(
                f"global model v{model.model_version} has architecture {model.fingerprint}, this device's task "
                f"builds {self.spec.fingerprint}: the agent and the aggregator must run the same task"
            )

    def run(self, model: GlobalModel, should_continue: Callable[[], bool]) -> LocalUpdate | None:
        """Train from ``model``; None if ``should_continue`` stopped it (nothing partial escapes)."""
        self.check(model)
        try:
            start = decode_weights(model.tensors, self.spec)
        except DecodeError as exc:
            raise FingerprintMismatch(f"global model v{model.model_version} is unusable: {exc}") from None
        set_weights(self.model, start)
        task = model.task
        settings = TrainSettings(
            epochs=task.local_epochs, batch_size=task.batch_size, lr=task.lr, momentum=task.momentum,
            weight_decay=task.weight_decay, mu=task.mu, seed=training_seed(self.seed, self.client_id, model.round),
        )
        kwargs = {"loss_fn": self.loss} if self.loss else {}
        result = train(self.model, self.data, settings, should_continue=should_continue, **kwargs)
        if not result.completed:
            return None
        local = get_weights(self.model)
        return LocalUpdate({name: local[name] - start[name] for name in start}, result)

"""Evaluation of a global model on this device's held-out split (federated evaluation).

Runs where training runs: in the training child (``train_worker``, kind ``evaluate``) or on the
agent's worker thread. It keeps a model of its own, so it never disturbs the trainer's.
"""

from __future__ import annotations

import time
from typing import Any

from edge_agent.errors import FingerprintMismatch
from edge_agent.participation import EvalOutcome
from fedge_contract import DecodeError, GlobalModel
from fedge_contract.codecs import decode_weights
from fedge_contract.tensors import ModelSpec
from fedge_tasks import Task, evaluate
from fedge_tasks.base import device_eval_data
from fedge_tasks.weights import get_weights, set_weights


class LocalEvaluator:
    def __init__(self, task: Task, client_id: str) -> None:
        self.client_id = client_id
        self.model = task.build_model()
        self.spec = ModelSpec.of(get_weights(self.model))
        self.data: Any = device_eval_data(task, client_id)
        self.loss = getattr(task, "loss", None)

    def run(self, model: GlobalModel) -> EvalOutcome | None:
        """Loss and accuracy of ``model`` here; None when this device has no held-out data."""
        if self.data is None or len(self.data) == 0:
            return None
        if model.fingerprint != self.spec.fingerprint:
            raise FingerprintMismatch(f"global model v{model.model_version} has architecture {model.fingerprint}, "
                                      f"this device's task builds {self.spec.fingerprint}")
        try:
            weights = decode_weights(model.tensors, self.spec)
        except DecodeError as exc:
            raise FingerprintMismatch(f"global model v{model.model_version} is unusable: {exc}") from None
        set_weights(self.model, weights)
        started = time.perf_counter()
        kwargs = {"loss_fn": self.loss} if self.loss else {}
        result = evaluate(self.model, self.data, **kwargs)
        return EvalOutcome(int(result["num_samples"]), result["loss"], result["accuracy"], time.perf_counter() - started)

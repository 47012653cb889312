"""A digits task whose held-out data lives on the devices only (federated evaluation): the
aggregator's ``eval_data()`` is None."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import TensorDataset

from fedge_tasks.digits import DigitsTask


@dataclass(frozen=True)
class DeviceEvalOnly(DigitsTask):
    def eval_data(self, client_id: str | None = None) -> TensorDataset | None:
        return None if client_id is None else super().eval_data(client_id)

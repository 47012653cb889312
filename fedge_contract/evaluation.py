"""EvalReport: a device's evaluation of one global model version on its own held-out data.

A device asked to evaluate (the announcement's ``cohort.eval`` threshold, fedge_contract.cohort)
publishes one small JSON report on ``fl/<fleet>/evals/<client_id>`` (QoS 1, not retained): the
loss, the accuracy and the number of samples they were measured on. The aggregator reduces a
version's reports to sample-weighted federated metrics (aggregator/observability/federated_eval.py).

Reports get no receipt: a device keeps no outbox for them and would do nothing with an answer, and
a lost report only makes one round's sample smaller. A refused report is logged and counted by the
aggregator. JSON, like the other control messages, so any MQTT tool can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import _json_bytes, _json_reader

__all__ = ["MAX_EVAL_SAMPLES", "EvalReport"]

MAX_EVAL_SAMPLES = 10**9


@dataclass(frozen=True)
class EvalReport:
    """``loss`` and ``accuracy`` of model ``model_version`` on ``num_samples`` of ``client_id``'s held-out data."""

    TYPE: ClassVar[str] = "eval"
    fleet: str
    client_id: str
    model_version: int
    num_samples: int
    loss: float
    accuracy: float
    seconds: float = 0.0  # how long the evaluation took on the device

    def __post_init__(self) -> None:
        _check(self, "eval")

    def to_bytes(self) -> bytes:
        return _json_bytes(self.TYPE, self.fleet, {
            "client_id": self.client_id, "model_version": self.model_version, "num_samples": self.num_samples,
            "loss": self.loss, "accuracy": self.accuracy, "seconds": self.seconds,
        })

    @classmethod
    def from_bytes(cls, payload: bytes, *, fleet: str | None = None) -> EvalReport:
        reader = _json_reader(payload, cls.TYPE, fleet)
        try:
            return cls(
                fleet=reader.take("fleet", str),
                client_id=reader.take("client_id", str),
                model_version=reader.nonneg_int("model_version"),
                num_samples=reader.take("num_samples", int),
                loss=reader.take("loss", float),
                accuracy=reader.take("accuracy", float),
                seconds=reader.take("seconds", float, default=0.0),
            )
        except ValueError as exc:
            raise DecodeError(Reason.BAD_VALUE, str(exc)) from None


def _check(report: EvalReport, where: str) -> None:
    """The values a reduction can trust: a count in range, a finite non-negative loss, an accuracy in [0, 1]."""
    if not 1 <= report.num_samples <= MAX_EVAL_SAMPLES:
        raise ValueError(f"{where}.num_samples must be 1-{MAX_EVAL_SAMPLES}, got {report.num_samples}")
    if not 0 <= report.loss < float("inf"):
        raise ValueError(f"{where}.loss must be finite and >= 0, got {report.loss}")
    if not 0 <= report.accuracy <= 1:
        raise ValueError(f"{where}.accuracy must be in [0, 1], got {report.accuracy}")
    if not 0 <= report.seconds < float("inf"):
        raise ValueError(f"{where}.seconds must be finite and >= 0, got {report.seconds}")

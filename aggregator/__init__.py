"""The fedge aggregator: owns the global model, runs the rounds, validates and folds updates.

Its layers, one sub-package each (the coordinator, aggregator/coordinator.py, composes them):

    rounds/         what a round is: the round-policy protocol, sync rounds, the FedBuff buffer
    ingest/         one update from bytes to receipt, chunked updates, this process as a source
    workers/        ingest by worker processes on a shared subscription (--workers N)
    aggregation/    the fold, defences (norm bound, robust rules, DP) and server strategies
    store/          the SQLite ledger, the spool's segment files, the thread that owns them
    observability/  Prometheus metrics, the dashboard, the fleet's presence
    broadcasting/   how each version reaches devices: delta broadcasts (the default) or whole models
    model.py        the global model and its checkpoints;  announce.py  what the fleet is told

Exports are lazy so that tools reading the store (reports, the simulation's orchestrator) do not
pay for importing torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.coordinator import Coordinator

__all__ = ["Aggregator", "AggregatorConfig", "Coordinator", "config_of"]


def __getattr__(name: str) -> Any:
    if name in ("Aggregator", "Coordinator"):
        from aggregator.coordinator import Coordinator

        return Coordinator
    if name in ("AggregatorConfig", "config_of"):
        from aggregator import config

        return getattr(config, name)
    raise AttributeError(name)

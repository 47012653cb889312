"""The fedge aggregator: owns the global model, runs the rounds, validates and folds updates.

Exports are lazy so that tools reading the store (reports, the simulation's orchestrator) do not
pay for importing torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.service import Aggregator

__all__ = ["Aggregator", "AggregatorConfig"]


def __getattr__(name: str) -> Any:
    if name == "Aggregator":
        from aggregator.service import Aggregator

        return Aggregator
    if name == "AggregatorConfig":
        from aggregator.config import AggregatorConfig

        return AggregatorConfig
    raise AttributeError(name)

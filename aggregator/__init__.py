"""The fedge aggregator: owns the global model, runs the rounds, validates and folds updates.

Exports are lazy so that tools reading the store (reports, the simulation's orchestrator) do not
pay for importing torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.service import Aggregator

__all__ = ["Aggregator", "AggregatorConfig", "make_aggregator"]


def make_aggregator(config: "AggregatorConfig", **kwargs: Any) -> "Aggregator":
    """The aggregator ``config`` asks for: async (FedBuff), sharded (``workers`` > 0) or the synchronous one."""
    if config.mode == "async":
        from aggregator.async_service import AsyncAggregator

        return AsyncAggregator(config, **kwargs)
    if config.workers:
        from aggregator.sharded import ShardedAggregator

        return ShardedAggregator(config, **kwargs)
    from aggregator.service import Aggregator

    return Aggregator(config, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Aggregator":
        from aggregator.service import Aggregator

        return Aggregator
    if name == "AggregatorConfig":
        from aggregator.config import AggregatorConfig

        return AggregatorConfig
    raise AttributeError(name)

"""The fedge aggregator: owns the global model, runs the rounds, validates and folds updates."""

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator

__all__ = ["Aggregator", "AggregatorConfig"]

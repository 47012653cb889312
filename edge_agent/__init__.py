"""The fedge edge agent: waits for the global model, trains when the device allows, uploads a delta."""

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig

__all__ = ["Agent", "AgentConfig"]

"""Real agents for secure rounds run by the real coordinator: each records the inputs it hands to the
protocol (so a test can compute the FedAvg the sum must equal) and can be *lost* mid-protocol (bench/secagg
loses them the same way): right
after it published a given message in its first session of a round, it publishes nothing more in that
session (as a device whose link died), and takes part normally in any later session or round."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent import Agent, AgentConfig
from edge_agent.secure_aggregation import Publisher, SecureAggregation
from fedge_contract import GlobalModel
from fedge_contract.secagg import DeviceMessage
from fedge_contract.tensors import ModelSpec


@dataclass(frozen=True)
class Input:
    """What a device handed to the protocol for a round: its delta and sample count."""

    delta: dict[str, np.ndarray]
    num_samples: int


class RecordingSecure(SecureAggregation):
    """The agent's secure-aggregation module, recording each round's input and losing itself when told."""

    def __init__(self, *, lose: Mapping[int, type[DeviceMessage]] | None = None, record: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lose = dict(lose or {})  # round -> the message after which the device is lost (its first session of that round)
        self.record = record  # keep each round's input (bench/secagg does not: 100 devices x 30 rounds of deltas)
        self.inputs: dict[int, Input] = {}
        self.muted: set[str] = set()  # sessions it was lost in
        self._lost_rounds: set[int] = set()

    def attach(self, publisher: Publisher, spec: ModelSpec) -> None:
        super().attach(_Losing(publisher, self), spec)

    async def submit(self, model: GlobalModel, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        if self.record:
            self.inputs[model.round] = Input({k: np.array(v, np.float32) for k, v in delta.items()}, num_samples)
        await super().submit(model, delta, num_samples)


class _Losing:
    def __init__(self, publisher: Publisher, module: RecordingSecure) -> None:
        self.publisher, self.module = publisher, module

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        module = self.module
        session = module.session
        if session is not None and session.setup.session in module.muted:
            return  # lost: nothing more leaves for this session
        await self.publisher.publish(topic, payload, retain=retain)
        if session is None:
            return
        setup = session.setup
        kind = module.lose.get(setup.round)
        if kind is not None and setup.round not in module._lost_rounds and topic == module.topics.device(kind, module.client_id):
            module._lost_rounds.add(setup.round)
            module.muted.add(setup.session)


def secure_agent(config: AgentConfig, *, lose: Mapping[int, type[DeviceMessage]] | None = None, **kwargs: Any) -> Agent:
    """A real Agent whose secure-aggregation module records its inputs (and is lost as ``lose`` says)."""
    agent = Agent(config, **kwargs)
    agent._secure = RecordingSecure(lose=lose, fleet=config.fleet, client_id=config.client_id, state_dir=config.state_dir,
                                    max_message_bytes=config.max_message_bytes, seed=config.seed, on_change=agent._presence_if_connected)
    return agent


def module(agent: Agent) -> RecordingSecure:
    secure = agent._secure
    assert isinstance(secure, RecordingSecure)
    return secure


def fedavg(agents: Iterable[Agent], round_no: int, spec: ModelSpec, max_weight: int = 1000) -> dict[str, np.ndarray]:
    """The sample-weighted mean of the agents' inputs for ``round_no`` (weights capped at ``max_weight``)."""
    inputs = [module(a).inputs[round_no] for a in agents]
    weights = [min(i.num_samples, max_weight) for i in inputs]
    return {t.name: sum(i.delta[t.name].astype(np.float64) * w for i, w in zip(inputs, weights, strict=True)) / sum(weights)  # type: ignore[misc]
            for t in spec.tensors}


def named(agents: Sequence[Agent], *clients: str) -> list[Agent]:
    return [a for a in agents if a.config.client_id in clients]

"""An agent resends unanswered updates when the model it already trained on is announced again."""

from __future__ import annotations

import numpy as np

from edge_agent import Agent, AgentConfig
from fedge_contract import GlobalModel, TaskConfig
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress


class _Checker:
    """Stands in for the LocalTrainer's architecture check (no torch needed here)."""

    def check(self, model: GlobalModel) -> None:
        pass


def _agent(tmp_path) -> Agent:
    agent = Agent(AgentConfig(BrokerAddress.parse("mqtt://127.0.0.1:1"), "agent-0", tmp_path))
    agent._trainer = _Checker()  # type: ignore[assignment]
    return agent


def _model(version: int, round_no: int) -> bytes:
    tensors = encode_weights({"w": np.zeros(3, np.float32)}, parse_chain("none"))
    return GlobalModel("default", version, round_no, None, TaskConfig(), "fp", tensors).to_bytes()


async def test_reannounced_round_resends_what_has_no_receipt(tmp_path):
    agent = _agent(tmp_path)
    agent._state.trained_version = 1
    agent._outbox.put(update_id="answered", round_no=1, base_version=0, payload=b"old")
    agent._outbox.put(update_id="waiting", round_no=2, base_version=1, payload=b"new")
    agent._outbox.remove("answered")
    agent._published = {"waiting"}
    agent._outbox_changed.clear()

    await agent._on_global(_model(version=1, round_no=2))  # v1 again: the round was re-announced

    assert agent._outbox_changed.is_set()
    assert "waiting" not in agent._published
    assert agent._latest is None  # nothing to train: v1 was trained already


async def test_a_new_version_is_trained_not_resent(tmp_path):
    agent = _agent(tmp_path)
    agent._state.trained_version = 1
    agent._outbox.put(update_id="waiting", round_no=2, base_version=1, payload=b"new")
    agent._published = {"waiting"}
    agent._outbox_changed.clear()

    await agent._on_global(_model(version=2, round_no=3))

    assert agent._latest is not None and agent._latest.model_version == 2
    assert agent._new_model.is_set()
    # the round-2 update is over (round 3 is announced): dropped, nothing to resend
    assert not agent._outbox.pending()

"""The agent's own files are written off its event loop, in the order a crash needs.

The fsync of an outbox entry can take a second on an SD card; meanwhile the loop must keep serving
the connection. The writes are real (tmp, fsync, rename); the test only holds the first one on
its thread, to show the loop runs while it waits, and records which file went when.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent import Agent, AgentConfig, files, outbox, residuals, state
from fedge_contract import GlobalModel, Receipt, ReceiptStatus, TaskConfig, Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.tensors import ModelSpec

WEIGHTS = {"w": np.zeros(3, np.float32)}


@pytest.fixture
def held_writes(monkeypatch):
    """atomic_write, recording (file, on the loop's thread?) and holding the first write until released."""
    writes: list[tuple[str, bool]] = []
    started, release = threading.Event(), threading.Event()
    loop_thread = threading.current_thread()

    def recording(path: Path, data: bytes) -> None:
        writes.append((path.name, threading.current_thread() is loop_thread))
        started.set()
        assert release.wait(30), "the test never released the write"
        files.atomic_write(path, data)

    for module in (outbox, residuals, state):
        monkeypatch.setattr(module, "atomic_write", recording)
    yield writes, started, release
    release.set()  # a failed test must not leave a thread waiting


def agent_and_update(tmp_path: Path) -> tuple[Agent, GlobalModel, Update]:
    agent = Agent(AgentConfig(BrokerAddress.parse("mqtt://127.0.0.1:1"), "agent-0", tmp_path))
    agent._spec = ModelSpec.of(WEIGHTS)
    tensors = encode_weights(WEIGHTS, parse_chain("none"))
    model = GlobalModel("default", 4, 2, None, TaskConfig(), agent._spec.fingerprint, tensors)
    update = Update("default", "agent-0", "u1", round=2, base_version=4, num_samples=7, tensors=tensors)
    return agent, model, update


async def test_outbox_residual_and_state_are_written_on_a_thread_in_order(tmp_path, held_writes):
    writes, started, release = held_writes
    agent, model, update = agent_and_update(tmp_path)
    residual = {"w": np.ones(3, np.float32)}
    async with asyncio.timeout(30):
        persisting = asyncio.create_task(agent._on_disk(agent._persist_update, model, update, update.to_bytes(), residual))
        await asyncio.to_thread(started.wait, 30)  # the outbox entry is being written...
        served = asyncio.Event()
        asyncio.get_running_loop().call_soon(served.set)
        await served.wait()  # ...and the loop still runs other work meanwhile
        assert not persisting.done()
        release.set()
        await persisting
    assert writes == [("r2-v4-u1.update", False), (f"residual-{agent._spec.fingerprint}.weights", False), ("state.json", False)]
    assert [p.update_id for p in agent._outbox.pending()] == ["u1"] and agent._state.trained_version == 4


async def test_file_operations_run_one_at_a_time_in_the_order_asked(tmp_path, held_writes):
    _, started, release = held_writes
    agent, model, update = agent_and_update(tmp_path)
    async with asyncio.timeout(30):
        put = asyncio.create_task(agent._on_disk(agent._persist_update, model, update, update.to_bytes(), None))
        await asyncio.to_thread(started.wait, 30)
        receipt = Receipt("default", "agent-0", "u1", ReceiptStatus.ACCEPTED, "", round=2, model_version=5)
        answered = asyncio.create_task(agent._on_receipt(receipt.to_bytes()))  # asked while the put is on disk
        await asyncio.sleep(0)
        assert not answered.done()  # it waits for the write before it: the remove never overtakes it
        release.set()
        await put
        await answered
    assert agent._outbox.pending() == []  # removed after it was written, not before

"""Issue 19: a training child whose agent was killed exits quietly.

A real agent process trains in its default child process; the task holds the child at its 3rd
batch on a named pipe (tests/integration/gating_task.py), so the test kills the agent while
training is provably mid-way. Released, the child sees its agent gone (EOF on its stdin) and
stops; its answer then has no reader. It used to print a BrokenPipeError traceback into the
log the device's owner reads, noise that hid real errors.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import psutil
import pytest

from fedge_contract import Topics
from tests.integration.faults import _env, outbox_ids
from tests.integration.fleet import raw_peer
from tests.integration.test_outbox_settlement import digits_model

pytestmark = pytest.mark.integration


async def test_a_training_child_exits_quietly_when_its_agent_is_killed(broker_address, fleet, tmp_path):
    fifo, marker, calls = tmp_path / "hold", tmp_path / "held-once", tmp_path / "calls.log"
    os.mkfifo(fifo)
    options = {"clients": "5", "alpha": "0.5", "fifo": str(fifo), "marker": str(marker), "calls": str(calls), "block_at": "3"}
    stderr = tmp_path / "agent.stderr"
    topics = Topics(fleet)
    async with asyncio.timeout(90), raw_peer(broker_address, "aggregator") as peer:
        await peer.client.publish(topics.global_model, digits_model(fleet, 0, 1), qos=1, retain=True)
        with stderr.open("wb") as err:  # the training child inherits the agent's stderr
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedge", "agent", f"--broker={broker_address}", f"--fleet={fleet}", "--client-id=agent-0",
                f"--state-dir={tmp_path / 'agent-0'}", "--policy=always", "--task=tests.integration.gating_task:BlockingDigits",
                *(f"--task-opt={k}={v}" for k, v in options.items()), f"--log-file={tmp_path / 'agent.log'}", "--log-level=debug",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err, env=_env(),
            )
        try:
            hold = await asyncio.to_thread(open, fifo, "wb")  # returns once the child is inside its 3rd batch
            [child] = psutil.Process(agent.pid).children()
            agent.send_signal(signal.SIGKILL)
            await agent.wait()
            hold.close()  # the child goes on, finds its agent gone, and stops
            await asyncio.to_thread(child.wait, 30)
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
    output = stderr.read_text()
    assert "Traceback" not in output and "BrokenPipeError" not in output, output
    assert len([line for line in output.splitlines() if line.strip()]) <= 1, output  # one debug line at most
    assert not outbox_ids(tmp_path / "agent-0")  # nothing partial was kept


@pytest.mark.parametrize("sent", [b"", b"\0\0\0\0\0\0\1\0partial"], ids=["nothing", "half a job"])
def test_a_child_whose_agent_died_before_sending_its_job_exits_quietly(sent, capfd):
    from edge_agent.train_worker import _child_main

    read, write = os.pipe()
    os.write(write, sent)
    os.close(write)  # the agent is gone
    reply_read, reply_write = os.pipe()
    with os.fdopen(reply_write, "wb") as reply:
        assert _child_main(read, reply) == 0
    os.close(read)
    assert os.read(reply_read, 100) == b""  # no answer, nobody to give it to
    os.close(reply_read)
    assert capfd.readouterr().err == ""

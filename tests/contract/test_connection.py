"""The Connection as a supervisor, against a real Mosquitto: a failure that is not a network problem
surfaces in the owner's ``async with`` and fails what waits on the connection instead of leaving it
hanging; cancelling the owner mid-publish leaves nothing running; a restarted persistent session
logs no aiomqtt traceback for acks of calls it abandoned (issue 19)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import LocalBroker
from fedge_contract import ContractError
from fedge_contract import _aiomqtt_compat as compat
from fedge_contract.mqtt import BrokerAddress, Connection, ConnectionFailed, Subscriber, make_client

pytestmark = pytest.mark.integration


def leftovers(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Tasks that exist now and did not before (the broker fixture's log reader did)."""
    return asyncio.all_tasks() - before - {asyncio.current_task()}  # type: ignore[operator]


@contextlib.contextmanager
def frozen(broker: LocalBroker) -> Iterator[None]:
    """The broker stopped (SIGSTOP): connections stay open, nothing is acknowledged."""
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{broker.pid}/stat")
    deadline = time.monotonic() + 5
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # stopped, not just signalled
        assert time.monotonic() < deadline, "the broker did not stop"
        time.sleep(0.001)
    try:
        yield
    finally:
        os.kill(broker.pid, signal.SIGCONT)


async def test_an_on_connect_that_raises_fails_the_connection_and_its_owner(broker_address, fleet):
    async def on_connect() -> None:
        raise RuntimeError("on_connect bug")

    connection = Connection(broker_address, f"{fleet}-c", subscriptions=[f"{fleet}/in"], persistent=False, on_connect=on_connect)
    body_went_on = False
    async with asyncio.timeout(20):
        before = asyncio.all_tasks()
        with pytest.raises(RuntimeError, match="on_connect bug"):
            async with connection:
                await connection.messages.get()  # nothing comes: the failure interrupts the body
                body_went_on = True
        assert not body_went_on and not leftovers(before)
        with pytest.raises(ConnectionFailed) as failed:
            await connection.publish(f"{fleet}/out", b"after")  # fails at once, never hangs
    assert isinstance(failed.value, ContractError) and isinstance(failed.value.cause, RuntimeError)


async def test_a_failure_fails_a_publish_and_a_flush_waiting_in_other_tasks(broker, broker_address, fleet):
    connection = Connection(broker_address, f"{fleet}-c", subscriptions=[], persistent=False)
    async with asyncio.timeout(30):
        before = asyncio.all_tasks()
        with contextlib.ExitStack() as thaw, pytest.raises(ValueError, match="wildcard"):
            async with connection:
                await connection.wait_connected()
                thaw.enter_context(frozen(broker))  # no PUBACK comes, until the connection is gone
                publisher = asyncio.create_task(connection.publish(f"{fleet}/out", b"waits"))
                connection.publish_soon(f"{fleet}/soon", b"waits too")
                flusher = asyncio.create_task(connection.flush())
                await asyncio.sleep(0)
                assert not publisher.done() and not flusher.done()
                connection.publish_soon(f"{fleet}/#", b"a bug: paho refuses wildcards in a topic name")
                await asyncio.Event().wait()
        for waiter in (publisher, flusher):
            with pytest.raises(ConnectionFailed) as failed:
                await waiter
            assert isinstance(failed.value.cause, ValueError)
        assert not leftovers(before)


async def test_cancelling_the_owner_mid_publish_leaves_no_task_running(broker, broker_address, fleet):
    connected, go, publishing = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def owner() -> None:
        async with Connection(broker_address, f"{fleet}-c", subscriptions=[f"{fleet}/in"], persistent=True) as conn:
            await conn.wait_connected()
            connected.set()
            await go.wait()
            conn.publish_soon(f"{fleet}/soon", b"x")
            publishing.set()
            await conn.publish(f"{fleet}/out", b"x" * 100_000)

    async with asyncio.timeout(30):
        before = asyncio.all_tasks()
        task = asyncio.create_task(owner())
        await connected.wait()
        with frozen(broker):
            go.set()
            await publishing.wait()
            await asyncio.sleep(0.05)  # the publish is written and waits for its PUBACK
            task.cancel()
            await asyncio.sleep(0)
            task.cancel()  # and again, as fedge's CLI does during a shutdown
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not leftovers(before)


async def test_a_subscriber_whose_handler_raises_fails_its_owner(broker_address, fleet):
    class Broken(Subscriber):
        async def on_message(self, topic: str, payload: bytes) -> None:
            raise LookupError(f"cannot handle {topic}")

    async with asyncio.timeout(20):
        before = asyncio.all_tasks()
        with pytest.raises(LookupError, match="cannot handle"):
            async with Broken(broker_address, f"{fleet}-sub", [f"{fleet}/in"]):
                async with make_client(broker_address, f"{fleet}-pub", persistent=False) as publisher:
                    await publisher.publish(f"{fleet}/in", b"hello")
                await asyncio.Event().wait()
        assert not leftovers(before)


async def test_a_subscriber_that_cannot_be_set_up_raises_on_entry(broker_address, fleet, tmp_path):
    """A configuration error is not a network problem: no endless reconnecting, a clear error at once."""
    address = BrokerAddress(broker_address.host, broker_address.port, tls=True, ca_file=str(tmp_path / "missing-ca.pem"))

    class Watcher(Subscriber):
        async def on_message(self, topic: str, payload: bytes) -> None:
            pass

    async with asyncio.timeout(20):
        with pytest.raises(FileNotFoundError):
            async with Watcher(address, f"{fleet}-sub", [f"{fleet}/in"]):
                pass


async def test_a_restarted_session_logs_no_traceback_for_acks_of_abandoned_calls(broker_address, fleet, caplog, monkeypatch):
    """Issue 19. An agent restarted after the final model: its persistent session hands it the queued
    final model at once, it stops what it was doing (here: a subscription change in flight, as the
    agent's chunk fetch does when a whole model supersedes it) and publishes its offline presence.
    The broker's SUBACK for the abandoned subscribe arrives on the connection that is still up;
    aiomqtt, which forgot the call, used to log it as an error with a KeyError traceback."""
    final, chunks = f"fl/{fleet}/global", f"fl/{fleet}/global/7/+"

    async def restart_after_final() -> None:
        async with Connection(broker_address, f"{fleet}-agent", subscriptions=[final], persistent=True) as agent:
            await agent.wait_connected()
        async with make_client(broker_address, f"{fleet}-aggregator", persistent=False) as aggregator:
            await aggregator.publish(final, b"final model", retain=True)  # queued in the agent's session
        async with Connection(broker_address, f"{fleet}-agent", subscriptions=[final], persistent=True) as agent:
            assert (await agent.messages.get()).payload == b"final model"
            await agent.wait_connected()
            fetch = asyncio.create_task(agent.subscribe(chunks))
            await asyncio.sleep(0)  # the SUBSCRIBE is written
            await cancel(fetch)  # superseded: the agent stops the fetch
            await agent.publish(f"fl/{fleet}/presence/agent", b"offline", retain=True)
            await agent.publish(f"fl/{fleet}/presence/agent", b"offline", retain=True)  # the SUBACK has come by now

    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(20):
        await restart_after_final()
    assert "Unexpected message ID" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "SUBACK for message id" in caplog.text  # the ack did arrive, and was recognised as expected

    # The control: without fedge's guard, aiomqtt logs the traceback this test is about.
    caplog.clear()
    monkeypatch.setattr(compat, "drop_late_acks", lambda client: None)
    fleet = f"{fleet}-unguarded"
    final, chunks = f"fl/{fleet}/global", f"fl/{fleet}/global/7/+"
    async with asyncio.timeout(20):
        await restart_after_final()
    assert "Unexpected message ID" in caplog.text


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_large_message_is_queued_as_a_view_and_arrives_whole(broker_address: BrokerAddress, fleet: str) -> None:
    """paho slices the rest of a packet on every partial send: queued as a bytearray, a 100 MB model was copied
    ~2 GB on the event loop; queued as a memoryview (compat.zero_copy_writes) the slices are views."""
    payload = os.urandom(6 * 1024 * 1024)
    topic = f"{fleet}/large"
    async with asyncio.timeout(30), make_client(broker_address, f"{fleet}-sub", persistent=False) as sub:
        await sub.subscribe(topic, qos=1)
        async with Connection(broker_address, f"{fleet}-pub", subscriptions=[], persistent=False) as conn:
            await conn.wait_connected()
            client = conn._client
            assert client is not None
            sent: list[tuple[type, int]] = []  # what paho hands the socket, per send
            paho = client._client
            send = paho._sock_send

            def spy(buf: bytes | bytearray | memoryview) -> int:
                sent.append((type(buf), len(buf)))
                return send(buf)

            paho._sock_send = spy
            await conn.publish(topic, payload)
        big = [kind for kind, length in sent if length > len(payload) // 2]
        assert big and all(kind is memoryview for kind in big), sent
        async for message in sub.messages:
            assert message.payload == payload
            break

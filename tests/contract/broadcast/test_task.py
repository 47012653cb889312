"""The task sent once: its id, GlobalTask, and announcements that only name it."""

from __future__ import annotations

import msgpack
import pytest

from fedge_contract import DecodeError, Reason, TaskConfig
from fedge_contract.broadcast import TASK_ID_BYTES, GlobalDelta, GlobalTask, task_id
from fedge_contract.topics import Topics
from tests.contract.broadcast.test_wire import delta_message, slots, wire

MAX = 1 << 20


def test_the_id_is_the_same_for_the_same_task_whatever_built_it() -> None:
    task = TaskConfig(local_epochs=3, batch_size=16, lr=0.5, extra={"mode": "async", "max_staleness": 4})
    assert len(task_id(task)) == TASK_ID_BYTES
    as_int = TaskConfig(local_epochs=3, batch_size=16, lr=1, extra={"max_staleness": 4, "mode": "async"})  # type: ignore[arg-type]
    assert task_id(as_int) == task_id(TaskConfig(local_epochs=3, batch_size=16, lr=1.0, extra={"mode": "async", "max_staleness": 4}))
    decoded = TaskConfig.from_wire(msgpack.unpackb(msgpack.packb(task.to_wire()), raw=False))
    assert task_id(decoded) == task_id(task)
    assert task_id(TaskConfig(lr=0.25)) != task_id(TaskConfig(lr=0.5))
    assert task_id(TaskConfig(extra={"mode": "async"})) != task_id(TaskConfig())


def test_a_delta_that_only_names_its_task_is_smaller_and_decodes_without_it() -> None:
    inline = delta_message()
    named = delta_message(task=None, task_id=inline.task_id)
    assert len(inline.to_bytes()) - len(named.to_bytes()) > 100
    decoded = GlobalDelta.from_bytes(named.to_bytes(), max_bytes=MAX)
    assert decoded == named and decoded.task is None and decoded.task_id == inline.task_id
    assert inline.task is not None and decoded.with_task(inline.task) == inline
    with pytest.raises(DecodeError) as caught:
        decoded.with_task(TaskConfig(lr=0.125))
    assert caught.value.reason is Reason.BAD_VALUE
    with pytest.raises(ValueError):
        GlobalDelta(**{**named.__dict__, "task_id": b""})


def test_final_round_trips() -> None:
    assert not GlobalDelta.from_bytes(delta_message().to_bytes(), max_bytes=MAX).final
    assert GlobalDelta.from_bytes(delta_message(final=True).to_bytes(), max_bytes=MAX).final


@pytest.mark.parametrize("change, reason", [
    ({"task_id": b"\0" * TASK_ID_BYTES}, Reason.BAD_VALUE),  # names another task than it carries
    ({"task_id": b"short"}, Reason.BAD_VALUE),
    ({"task_id": "0" * TASK_ID_BYTES}, Reason.WRONG_TYPE),
    ({"task_id": None}, Reason.WRONG_TYPE),
])
def test_a_bad_task_id_is_refused(change: dict[str, object], reason: Reason) -> None:
    for payload in (wire(**change), slots(**change)):  # the map form and the compact form
        with pytest.raises(DecodeError) as caught:
            GlobalDelta.from_bytes(payload, max_bytes=MAX)
        assert caught.value.reason is reason


def test_global_task_round_trips_and_is_strict() -> None:
    message = GlobalTask("f1", TaskConfig(lr=0.5, codec="flat+topk:0.02+q4+zstd"))
    assert GlobalTask.from_bytes(message.to_bytes(), fleet="f1") == message
    assert Topics("f1").global_task == "fl/f1/global/task"
    assert Topics("f1").chunk_of(Topics("f1").global_task) is None
    obj = msgpack.unpackb(message.to_bytes(), raw=False)
    for key, value, reason in [("task_id", b"\1" * TASK_ID_BYTES, Reason.BAD_VALUE), ("task", None, Reason.WRONG_TYPE),
                               ("type", "global", Reason.WRONG_TYPE), ("fleet", "other", Reason.WRONG_FLEET)]:
        with pytest.raises(DecodeError) as caught:
            GlobalTask.from_bytes(msgpack.packb({**obj, key: value}, use_bin_type=True), fleet="f1")
        assert caught.value.reason is reason
    with pytest.raises(DecodeError) as caught:
        GlobalTask.from_bytes(message.to_bytes(), max_bytes=10)
    assert caught.value.reason is Reason.TOO_LARGE

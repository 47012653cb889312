"""Training in a child process, so the long-lived agent never imports torch.

``import torch`` alone costs ~218 MiB of resident memory. The agent that waits for rounds for
months imports only the contract, aiomqtt, msgpack and numpy (~40 MiB); each training runs in
a fresh ``python`` running ``edge_agent.train_worker.main``, which loads the task, trains, returns the delta and
exits, so the operating system takes all of torch's memory back.

The pipe protocol (parent -> child on stdin, child -> parent on stdout) is one frame each way:
an 8-byte big-endian length and a msgpack map. After its job frame the parent keeps stdin open;
writing anything more, or closing it (the agent died), tells the child to stop before its next
batch and report an incomplete result. Nothing partial is ever returned: the delta travels only
when training completed. The child's logs go to the inherited stderr.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import msgpack
import numpy as np

from edge_agent.errors import FingerprintMismatch, TrainingFailed
from edge_agent.participation import EvalOutcome
from fedge_contract.frames import HEADER as _HEADER
from fedge_contract.frames import pack_frame, read_frame
from fedge_contract.messages import pack_weights, unpack_weights
from fedge_contract.tensors import ModelSpec, TensorSpec

log = logging.getLogger("fedge.train_worker")


@dataclass(frozen=True)
class TrainJob:
    """Everything the child needs besides the model: plain values only (it crosses a pipe)."""

    task: str
    task_options: Mapping[str, str]
    client_id: str
    seed: int
    fleet: str
    max_model_bytes: int
    torch_threads: int = 1
    nice: int = 0  # added to the child's niceness: training yields the CPU to the device's owner
    max_data_mib: float | None = None  # refuse training data (and model) larger than this
    log_level: str = "warning"
    sys_path: tuple[str, ...] = field(default_factory=lambda: tuple(sys.path))  # task modules import as in the agent


@dataclass(frozen=True)
class Outcome:
    """TrainResult's fields the agent reports, without importing torch to unpickle it."""

    num_samples: int
    loss: float
    accuracy: float
    seconds: float
    batches: int
    peak_rss_mib: float


@dataclass(frozen=True)
class ChildUpdate:
    delta: dict[str, np.ndarray]
    result: Outcome


class StopSignal:
    """Tells a running child to stop; ``set()`` writes the stop byte at once (no task hop in between)."""

    def __init__(self) -> None:
        self._set = False
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        if not self._set:
            self._set = True
            for callback in self._callbacks:
                callback()

    def is_set(self) -> bool:
        return self._set

    def on_set(self, callback: Callable[[], None]) -> None:
        if self._set:
            callback()
        else:
            self._callbacks.append(callback)


# ---------------------------------------------------------------------- parent side
async def describe_in_child(job: TrainJob) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Load the task once in a child: its model's spec and initial weights (version 0, which a device
    builds itself under delta broadcasts); surfaces task errors at start."""
    reply = await _run_child({"kind": "describe", **_job_dict(job)}, None)
    spec = ModelSpec(tuple(TensorSpec(str(name), tuple(int(d) for d in shape), str(dtype)) for name, shape, dtype in reply["spec"]))
    return spec, unpack_weights(reply["initial"])


async def train_in_child(job: TrainJob, model_payload: bytes, stop: StopSignal) -> ChildUpdate | None:
    """Train in a child; None when ``stop`` was set before it finished (nothing partial returned)."""
    reply = await _run_child({"kind": "train", "model": model_payload, **_job_dict(job)}, stop)
    if not reply["completed"]:
        return None
    outcome = Outcome(**{f.name: reply[f.name] for f in dataclasses.fields(Outcome)})
    return ChildUpdate(unpack_weights(reply["delta"]), outcome)


async def evaluate_in_child(job: TrainJob, model_payload: bytes) -> EvalOutcome | None:
    """Evaluate the global model on this device's held-out split in a child (federated evaluation); None: no such data."""
    reply = await _run_child({"kind": "evaluate", "model": model_payload, **_job_dict(job)}, None)
    if not reply.get("evaluated"):
        return None
    return EvalOutcome(int(reply["num_samples"]), float(reply["loss"]), float(reply["accuracy"]), float(reply["seconds"]))


def _job_dict(job: TrainJob) -> dict[str, Any]:
    data = dataclasses.asdict(job)
    data["task_options"] = dict(job.task_options)
    data["sys_path"] = list(job.sys_path)
    return data


async def _run_child(request: dict[str, Any], stop: StopSignal | None) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        # -c, not -m: the package already imports this module, and runpy would warn about running it twice
        sys.executable, "-c", "import sys; from edge_agent.train_worker import main; sys.exit(main())",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin
    try:
        stdin.write(pack_frame(request))
        await stdin.drain()
        if stop is not None:  # the child stops before its next batch once this byte is in the pipe
            stop.on_set(lambda: None if stdin.is_closing() else stdin.write(b"S"))
        reply = await read_frame(proc.stdout)
        stdin.close()
        code = await proc.wait()
    except BaseException:
        # cancelled (agent stopping) or broken pipe: the child must not outlive its round
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    if reply is None:
        raise TrainingFailed(f"the training process exited with code {code} before answering (out of memory? see its log above)")
    if not reply.get("ok"):
        if reply.get("kind") == "refused":
            raise FingerprintMismatch(reply.get("error", ""))
        raise TrainingFailed(reply.get("error", "training failed"))
    return reply


# ---------------------------------------------------------------------- child side
def _read_exact(fd: int, n: int) -> bytes:
    """Unbuffered: a buffered reader could swallow the stop byte that select() must see on the fd."""
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the agent closed the pipe before sending the whole job")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _child_main(stdin_fd: int, stdout: BinaryIO) -> int:
    try:
        (length,) = _HEADER.unpack(_read_exact(stdin_fd, _HEADER.size))
        request = msgpack.unpackb(_read_exact(stdin_fd, length), raw=False)
    except EOFError:
        return 0  # the agent died before its job was sent: nothing to do, nobody to tell
    logging.basicConfig(level=str(request.get("log_level", "warning")).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[train] %(message)s")
    for entry in reversed(request.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if request.get("nice"):
        try:
            os.nice(int(request["nice"]))
        except OSError:
            log.warning("could not lower the training priority by %s", request["nice"])
    try:
        reply = _serve(request, stdin_fd)
    except FingerprintMismatch as exc:
        reply = {"ok": False, "kind": "refused", "error": str(exc)}
    except TrainingFailed as exc:
        reply = {"ok": False, "kind": "failed", "error": str(exc)}
    except Exception as exc:  # the parent turns this into a clear TrainingFailed
        log.debug("training failed", exc_info=True)
        reply = {"ok": False, "kind": "failed", "error": f"{type(exc).__name__}: {exc}"}
    try:
        stdout.write(pack_frame(reply))
        stdout.flush()
    except BrokenPipeError:
        _orphaned(stdout)
    return 0


def _orphaned(stdout: BinaryIO) -> None:
    """The agent is gone (killed mid-training): its answer has no reader. One debug line, no traceback.

    The reply's descriptor is pointed at /dev/null, so the buffered bytes that closing it at exit
    flushes cannot raise a second BrokenPipeError ("Exception ignored ...") either.
    """
    log.debug("the agent is gone: nobody reads this training's result")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stdout.fileno())
    os.close(devnull)


def _serve(request: dict[str, Any], stdin_fd: int) -> dict[str, Any]:
    import resource
    import select

    import psutil

    from edge_agent.trainer import LocalTrainer
    from fedge_contract import GlobalModel
    from fedge_tasks import load_task
    from fedge_tasks.runtime import limit_torch_threads

    limit_torch_threads(int(request["torch_threads"]))
    task = load_task(request["task"], request["task_options"])
    if request["kind"] == "evaluate":
        return _evaluate(task, request)
    before = psutil.Process().memory_info().rss
    trainer = LocalTrainer(task, request["client_id"], int(request["seed"]))
    data_mib = (psutil.Process().memory_info().rss - before) / 2**20
    limit = request.get("max_data_mib")
    if limit is not None and data_mib > float(limit):
        raise TrainingFailed(
            f"the task's model and training data take {data_mib:.0f} MiB, over max_train_memory_mib={limit:.0f}: "
            "raise the limit or give this device less data"
        )
    if request["kind"] == "describe":
        from fedge_tasks.weights import get_weights

        spec = [[t.name, list(t.shape), t.dtype] for t in trainer.spec.tensors]
        return {"ok": True, "spec": spec, "data_mib": data_mib, "initial": pack_weights(get_weights(trainer.model))}
    model = GlobalModel.from_bytes(request["model"], max_bytes=int(request["max_model_bytes"]), fleet=request["fleet"])

    def should_continue() -> bool:
        readable, _, _ = select.select([stdin_fd], [], [], 0)
        return not readable  # a stop byte, or EOF because the agent is gone

    local = trainer.run(model, should_continue)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if local is None:
        return {"ok": True, "completed": False}
    result = local.result
    return {
        "ok": True, "completed": True, "delta": pack_weights(local.delta),
        "num_samples": result.num_samples, "loss": result.loss, "accuracy": result.accuracy,
        "seconds": result.seconds, "batches": result.batches, "peak_rss_mib": peak,
    }


def _evaluate(task: Any, request: dict[str, Any]) -> dict[str, Any]:
    from edge_agent.evaluator import LocalEvaluator
    from fedge_contract import GlobalModel

    model = GlobalModel.from_bytes(request["model"], max_bytes=int(request["max_model_bytes"]), fleet=request["fleet"])
    outcome = LocalEvaluator(task, request["client_id"]).run(model)
    if outcome is None:
        return {"ok": True, "evaluated": False}
    return {"ok": True, "evaluated": True, **dataclasses.asdict(outcome)}


def main() -> int:
    # Our reply owns the real stdout; anything a task prints goes to stderr instead.
    reply_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return _child_main(0, reply_out)


if __name__ == "__main__":
    sys.exit(main())

"""The task plug-in interface and its loader.

A user names a task as ``package.module:object`` (or a built-in alias such as ``digits``). The
object is a Task, or a class/callable that returns one; ``--task-opt key=value`` options are
passed to it as keyword arguments, converted to the types its dataclass fields declare.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

BUILTIN_TASKS = {"digits": "fedge_tasks.digits:DigitsTask", "synthetic": "fedge_tasks.synthetic:SyntheticTask"}


class TaskLoadError(Exception):
    """The named task cannot be imported or built; the message says what to fix."""


@runtime_checkable
class Task(Protocol):
    """What fedge needs from a user's federated task.

    ``train_data`` runs on the device and returns that device's own samples, a
    ``torch.utils.data.Dataset`` of ``(input, target)`` pairs.

    Optional methods:

    - ``eval_data(client_id=None)``: held-out data. Called without a client id on the aggregator
      (its own held-out set; None or no method: the aggregator does not evaluate); called with a
      client id on a device asked to evaluate (federated evaluation: that device's own held-out
      split; None: this device has none). A task whose ``eval_data`` takes no argument evaluates
      on the aggregator only. Use ``server_eval_data`` and ``device_eval_data`` to call it.
    - ``loss(outputs, targets)``; the default is cross-entropy.
    - ``suggested_training()``: local training settings the aggregator starts from.
    """

    def build_model(self) -> Any: ...

    def train_data(self, client_id: str) -> Any: ...

    # Optional (see above): declared for type checkers; ``load_task`` does not require it.
    def eval_data(self, client_id: str | None = None) -> Any: ...


def is_task(obj: object) -> bool:
    """Whether ``obj`` has what every task must have (``build_model``, ``train_data``); the rest is optional."""
    return all(callable(getattr(obj, name, None)) for name in ("build_model", "train_data"))


def server_eval_data(task: object) -> Any | None:
    """The aggregator's held-out set: ``task.eval_data()``, or None when the task has none."""
    method = getattr(task, "eval_data", None)
    return method() if callable(method) else None


def device_eval_data(task: object, client_id: str) -> Any | None:
    """``client_id``'s own held-out split: ``task.eval_data(client_id)``, or None when the task has none for devices."""
    method = getattr(task, "eval_data", None)
    if not callable(method) or not evaluates_on_devices(task):
        return None
    return method(client_id)


def evaluates_on_devices(task: object) -> bool:
    """Whether ``task.eval_data`` takes a client id (federated evaluation)."""
    method = getattr(task, "eval_data", None)
    if not callable(method):
        return False
    try:
        inspect.signature(method).bind("client")
    except (TypeError, ValueError):
        return False
    return True


def load_task(spec: str, options: Mapping[str, str] | None = None) -> Task:
    """Import and build the task named by ``spec``."""
    options = dict(options or {})
    target = BUILTIN_TASKS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TaskLoadError(f"task {spec!r} must look like 'package.module:object' (or one of: {', '.join(BUILTIN_TASKS)})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskLoadError(f"cannot import task module {module_name!r}: {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise TaskLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if is_task(obj) and not isinstance(obj, type):
        if options:
            raise TaskLoadError(f"task {spec!r} is an instance: it takes no options, got {sorted(options)}")
        return obj
    if not callable(obj):
        raise TaskLoadError(f"task {spec!r} is neither a Task nor a callable returning one")
    try:
        task = obj(**_coerce(obj, options))
    except TypeError as exc:
        raise TaskLoadError(f"task {spec!r} refused its options {options}: {exc}") from exc
    if not is_task(task):
        raise TaskLoadError(f"task {spec!r} returned {type(task).__name__}, which lacks build_model/train_data")
    return task


def _coerce(factory: Any, options: dict[str, str]) -> dict[str, Any]:
    """Convert string options to the field types of a dataclass factory (others get strings)."""
    if not dataclasses.is_dataclass(factory):
        return dict(options)
    hints = typing.get_type_hints(factory)
    known = {f.name for f in dataclasses.fields(factory)}
    out: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in known:
            raise TaskLoadError(f"task option {key!r} is unknown (known: {', '.join(sorted(known))})")
        kind = hints.get(key, str)
        try:
            out[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
        except (TypeError, ValueError):
            raise TaskLoadError(f"task option {key}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return out


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["alpha=0.5", "clients=20"]`` -> dict, with a clear error for a pair without ``=``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TaskLoadError(f"task option {pair!r} must be KEY=VALUE")
        out[key] = value.strip()
    return out

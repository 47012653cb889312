"""Tasks: what a federation trains (a model builder and data), with default train/evaluate loops.

Both programs load the same task by name (``module:object``): the agent for its local data and
training, the aggregator for the initial model and the held-out evaluation. This is the one part
of fedge that imports torch, and only when a loop or a task is used: exports are lazy so that
``fedge --help`` or an idle agent does not pay ~1 s and ~220 MiB for it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedge_tasks.base import Task, TaskLoadError, load_task
    from fedge_tasks.loops import TrainResult, TrainSettings, evaluate, train

__all__ = ["Task", "TaskLoadError", "TrainResult", "TrainSettings", "evaluate", "load_task", "train"]

_HOMES = {
    "Task": "fedge_tasks.base",
    "TaskLoadError": "fedge_tasks.base",
    "load_task": "fedge_tasks.base",
    "TrainResult": "fedge_tasks.loops",
    "TrainSettings": "fedge_tasks.loops",
    "evaluate": "fedge_tasks.loops",
    "train": "fedge_tasks.loops",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)

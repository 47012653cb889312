"""Tasks: what a federation trains (a model builder and data), with default train/evaluate loops.

Both programs load the same task by name (``module:object``): the agent for its local data and
training, the aggregator for the initial model and the held-out evaluation. This is the one part
of fedge that imports torch.
"""

from fedge_tasks.base import Task, TaskLoadError, load_task
from fedge_tasks.loops import TrainResult, TrainSettings, evaluate, train

__all__ = ["Task", "TaskLoadError", "TrainResult", "TrainSettings", "evaluate", "load_task", "train"]

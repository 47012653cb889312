"""The global model the aggregator owns: its weights and version, the strategy that steps it, and
its checkpoints (resume from the store; each new version committed before it is announced, with
the broadcast state of that version when delta broadcasts are on: aggregator/broadcasting/).

The weights here are the *true* model. Under delta broadcasts devices hold a model that trails it
by what the last broadcast could not carry (server-side error feedback); ``evaluate`` scores the
held model as the round's ``accuracy``/``loss`` (what the fleet runs) and the true one beside it.

Every step that touches a whole model (loading a checkpoint, the strategy's step, writing the
checkpoint, evaluating) runs off the event loop: on the store's thread or a worker thread. A
100 MB model took 1.43 s to checkpoint, which on the loop stalled every keepalive and receipt.
This module imports torch only when a task is loaded (``load``), so a worker importing the
aggregator stays small.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.aggregation.strategies import Strategy, make_strategy
from aggregator.config import AggregatorConfig
from aggregator.errors import StoreMismatch
from aggregator.store import BroadcastState, Checkpoint, Store, StoreAccess, call
from fedge_contract import TaskConfig
from fedge_contract.tensors import ModelSpec

if TYPE_CHECKING:
    from fedge_tasks import Task

log = logging.getLogger("fedge.aggregator")


def training_config(task: Task, overrides: Mapping[str, Any], extra: Mapping[str, Any]) -> TaskConfig:
    """The round's TaskConfig: contract defaults < the task's suggestion < explicit overrides (< the mode's extra fields)."""
    suggested: dict[str, Any] = getattr(task, "suggested_training", dict)()
    config = TaskConfig(**{**suggested, **overrides})
    return dataclasses.replace(config, extra={**config.extra, **extra}) if extra else config


class GlobalModel:
    """Version ``version`` of the fleet's model, as the checkpoints hold it."""

    def __init__(self, config: AggregatorConfig, task: Task, task_extra: Mapping[str, Any]) -> None:
        from fedge_tasks.base import server_eval_data
        from fedge_tasks.runtime import limit_torch_threads
        from fedge_tasks.weights import get_weights

        limit_torch_threads(1)
        self.config = config
        self.task = task
        self.torch_model = task.build_model()
        self.eval_data = server_eval_data(task) if config.evaluate else None  # None: the task has no server-side data
        self.loss = getattr(task, "loss", None)
        self.weights: dict[str, np.ndarray] = get_weights(self.torch_model)
        self.spec = ModelSpec.of(self.weights)
        self.training = training_config(task, config.training.overrides(), task_extra)
        self.strategy: Strategy = make_strategy(config.strategy.name, config.strategy)
        self.version = 0

    @property
    def done(self) -> bool:
        """Every version asked for exists (``rounds`` 0: never)."""
        rounds = self.config.rounds.rounds
        return rounds > 0 and self.version >= rounds

    async def resume(self, db: StoreAccess, initial: Callable[[Mapping[str, np.ndarray]], Awaitable[BroadcastState | None]] | None = None) -> int:
        """Claim the store for this fleet and model, take a new epoch, and load the newest checkpoint
        (or record version 0, with ``initial``'s broadcast state of it); the epoch fences out an earlier aggregator's workers."""
        fingerprint = self.spec.fingerprint
        for key, value in (("fleet", self.config.fleet), ("fingerprint", fingerprint)):
            other = await call(db, Store.claim, key, value)
            if other is not None:
                raise StoreMismatch(
                    f"store {self.config.store} holds {key} {other!r}, not {value!r}: use another --store for this fleet/task"
                )
        epoch = await call(db, Store.take_over)
        checkpoint: Checkpoint | None = await call(db, Store.latest_checkpoint)
        if checkpoint is None:
            state = await initial(self.weights) if initial is not None else None
            await call(db, Store.save_initial, fingerprint, self.weights, state)
            log.info("initialised model v0 (%d parameters, fingerprint %s)", self.spec.num_parameters, fingerprint)
            return epoch
        self.strategy.load_state(checkpoint.strategy_state)
        self.weights, self.version = checkpoint.weights, checkpoint.version
        log.info("resumed from checkpoint v%d in %s", self.version, self.config.store)
        return epoch

    async def step(self, mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next weights (the strategy on a worker thread); ``commit`` makes them the model."""
        return await asyncio.to_thread(self.strategy.apply, self.weights, mean_delta)

    async def commit(self, db: StoreAccess, round_no: int, weights: dict[str, np.ndarray], accepted: int,
                     metrics: Mapping[str, float], broadcast_state: BroadcastState | None = None) -> None:
        """Checkpoint ``weights`` as the next version (atomically with the round's close, its figures and the
        version's broadcast state), then hold them."""
        version = self.version + 1
        await call(db, Store.close_round, round_no, version, self.spec.fingerprint, weights, self.strategy.state(), accepted,
                   metrics, broadcast_state)
        self.weights, self.version = weights, version

    async def evaluate(self, weights: Mapping[str, np.ndarray], held: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """Held-out accuracy and loss of ``weights`` (none without server-side data); with ``held`` (the model
        devices hold under delta broadcasts) those are the held model's, and ``true_accuracy``/``true_loss`` the true one's."""
        if self.eval_data is None:
            return {}
        if held is None:
            return await asyncio.to_thread(self._evaluate, weights)
        figures = await asyncio.to_thread(self._evaluate, held)
        true = await asyncio.to_thread(self._evaluate, weights)
        return {**figures, **{f"true_{name}": value for name, value in true.items()}}

    def _evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        from fedge_tasks.loops import evaluate
        from fedge_tasks.weights import set_weights

        assert self.eval_data is not None
        set_weights(self.torch_model, weights)
        kwargs = {"loss_fn": self.loss} if self.loss else {}
        result = evaluate(self.torch_model, self.eval_data, **kwargs)
        return {"accuracy": result["accuracy"], "loss": result["loss"]}


def load_task(config: AggregatorConfig, task: Task | None) -> Task:
    """The task ``config`` names (``task`` given: that one)."""
    if task is not None:
        return task
    from fedge_tasks import load_task as load

    return load(config.task, config.task_options)

"""Loading tasks by name with typed options, and the built-in digits task."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedge_tasks import Task, TaskLoadError, load_task
from fedge_tasks.base import parse_options
from fedge_tasks.digits import DigitsTask, load_split

# ---------------------------------------------------------------- a fake user task module


@dataclass(frozen=True)
class _FakeTask:
    size: int = 1
    rate: float = 0.1
    verbose: bool = False
    name: str = "x"

    def build_model(self) -> object:
        return None

    def train_data(self, client_id: str) -> object:
        return []

    def eval_data(self) -> object:
        return None


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("fake_fedge_task")
    module.FakeTask = _FakeTask  # type: ignore[attr-defined]
    module.INSTANCE = _FakeTask(size=7)  # type: ignore[attr-defined]
    module.not_a_task = lambda: 42  # type: ignore[attr-defined]
    module.CONSTANT = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_fedge_task", module)
    return module


def test_options_are_coerced_to_field_types(fake_module: types.ModuleType) -> None:
    task = load_task("fake_fedge_task:FakeTask", {"size": "12", "rate": "0.5", "verbose": "yes", "name": "n"})
    assert task == _FakeTask(size=12, rate=0.5, verbose=True, name="n")
    assert isinstance(task, Task)


@pytest.mark.parametrize(
    "raw, expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("no", False), ("off", False)]
)
def test_bool_options(fake_module: types.ModuleType, raw: str, expected: bool) -> None:
    assert load_task("fake_fedge_task:FakeTask", {"verbose": raw}).verbose is expected  # type: ignore[attr-defined]


def test_instance_task(fake_module: types.ModuleType) -> None:
    assert load_task("fake_fedge_task:INSTANCE") is fake_module.INSTANCE
    with pytest.raises(TaskLoadError, match="instance"):
        load_task("fake_fedge_task:INSTANCE", {"size": "1"})


@pytest.mark.parametrize(
    "spec",
    [
        "no-colon",
        ":FakeTask",
        "fake_fedge_task:",
        "no_such_module_for_fedge_tests:Task",
        "fake_fedge_task:Missing",
        "fake_fedge_task:not_a_task",  # a callable that returns no Task
        "fake_fedge_task:CONSTANT",  # neither Task nor callable
    ],
)
def test_bad_task_specs(fake_module: types.ModuleType, spec: str) -> None:
    with pytest.raises(TaskLoadError):
        load_task(spec)


@pytest.mark.parametrize("options", [{"size": "big"}, {"rate": "fast"}, {"colour": "red"}])
def test_bad_options(fake_module: types.ModuleType, options: dict[str, str]) -> None:
    with pytest.raises(TaskLoadError):
        load_task("fake_fedge_task:FakeTask", options)


def test_parse_options() -> None:
    assert parse_options(["alpha=0.5", " clients = 20 ", "expr=a=b", "empty="]) == {
        "alpha": "0.5", "clients": "20", "expr": "a=b", "empty": "",
    }
    assert parse_options([]) == {}


@pytest.mark.parametrize("pair", ["alpha", "=0.5", ""])
def test_parse_options_rejects(pair: str) -> None:
    with pytest.raises(TaskLoadError):
        parse_options([pair])


# ---------------------------------------------------------------- digits


def test_load_digits_with_options() -> None:
    task = load_task("digits", {"alpha": "0.5", "clients": "20"})
    assert isinstance(task, DigitsTask)
    assert task.alpha == 0.5 and isinstance(task.alpha, float)
    assert task.clients == 20 and isinstance(task.clients, int)
    assert load_task("fedge_tasks.digits:DigitsTask", {"clients": "5"}) == DigitsTask(clients=5)


def test_digits_unknown_option() -> None:
    with pytest.raises(TaskLoadError, match="unknown"):
        load_task("digits", {"alhpa": "0.5"})


@pytest.mark.parametrize("options", [{"clients": "twenty"}, {"alpha": "high"}, {"clients": "2.5"}])
def test_digits_bad_value(options: dict[str, str]) -> None:
    with pytest.raises(TaskLoadError):
        load_task("digits", options)


@pytest.mark.parametrize("client_id, shard", [("agent-7", 7), ("agent-0", 0), ("agent-27", 7), ("pi4-b-013", 13), ("7", 7)])
def test_shard_of(client_id: str, shard: int) -> None:
    assert DigitsTask(clients=20).shard_of(client_id) == shard


@pytest.mark.parametrize("client_id", ["agent", "agent-7x", ""])
def test_shard_of_needs_a_trailing_number(client_id: str) -> None:
    with pytest.raises(TaskLoadError):
        DigitsTask().shard_of(client_id)


def test_split_sizes_and_scaling() -> None:
    x_tr, y_tr, x_te, y_te = load_split()
    assert x_tr.shape == (1437, 64) and y_tr.shape == (1437,)
    assert x_te.shape == (360, 64) and y_te.shape == (360,)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert set(np.unique(y_te)) == set(range(10))  # stratified


def test_train_and_eval_data() -> None:
    task = DigitsTask(clients=5, alpha=0.5)
    sizes = [len(task.train_data(f"agent-{i}")) for i in range(5)]
    assert sum(sizes) == 1437 and min(sizes) >= 10
    x, y = task.train_data("agent-2")[0]
    assert x.shape == (64,) and y.dtype == torch.int64
    assert len(task.train_data("agent-7")) == sizes[2]  # 7 % 5 == 2: same shard
    assert len(task.eval_data()) == 360


def test_build_model_is_seeded() -> None:
    a = DigitsTask(hidden=16).build_model()
    b = DigitsTask(hidden=16).build_model()
    c = DigitsTask(hidden=16, init_seed=1).build_model()
    for (name, pa), (_, pb), (_, _pc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])
    assert a(torch.zeros(3, 64)).shape == (3, 10)


def test_stratified_split() -> None:
    from fedge_tasks.digits import stratified_split

    labels = np.repeat(np.arange(3), [50, 30, 21])  # 101 samples
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(test) == 21 and len(train) == 80  # ceil(0.2 * 101) = 21, as scikit-learn counts
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(101))  # disjoint, covering
    per_class = np.bincount(labels[test], minlength=3)
    assert np.all(np.abs(per_class - np.array([50, 30, 21]) * 0.2) < 1)  # [10, 6, 4.2] -> 10, 6, 4 or 5
    again_train, again_test = stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(again_test, test)
    np.testing.assert_array_equal(again_train, train)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], test)


def test_digits_initial_weights_do_not_depend_on_other_threads_drawing_random_numbers() -> None:
    """An aggregator and in-process agents build their models at once (threads): the initial model must not
    depend on who else draws from torch's global generator meanwhile."""
    import threading

    reference = DigitsTask().build_model().state_dict()
    built: list[dict[str, torch.Tensor]] = []
    stop = threading.Event()

    def noise() -> None:
        while not stop.is_set():
            torch.rand(64)

    def build() -> None:
        for _ in range(20):
            built.append(DigitsTask().build_model().state_dict())

    drawers = [threading.Thread(target=noise) for _ in range(2)]
    builders = [threading.Thread(target=build) for _ in range(3)]
    for thread in drawers + builders:
        thread.start()
    for thread in builders:
        thread.join(60)
    stop.set()
    for thread in drawers:
        thread.join(60)
    assert len(built) == 60
    assert all(torch.equal(state[name], reference[name]) for state in built for name in reference)

"""The agent's participation logic (edge_agent/participation.py) with the evaluation and the
publishing faked: unit level."""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.participation import EvalOutcome, Evaluations, plan
from fedge_contract import GlobalModel, TaskConfig, Topics
from fedge_contract.cohort import EVAL_ALL, InviteSet, Participation
from fedge_contract.evaluation import EvalReport


def announcement(version: int, cohort: Participation | None, *, final: bool = False) -> GlobalModel:
    return GlobalModel("f", version, version + 1, None, TaskConfig(), "fp", (), final=final, cohort=cohort)


def test_plan_follows_the_cohort_and_trains_everyone_without_one():
    invited = Participation(InviteSet.of(["a"], fleet="f", round_no=4, bits=16), EVAL_ALL)
    assert plan(announcement(3, invited), "a").train and not plan(announcement(3, invited), "b").train
    assert plan(announcement(3, invited), "b").evaluate
    assert plan(announcement(3, None), "b").train and not plan(announcement(3, None), "b").evaluate
    assert not plan(announcement(3, invited, final=True), "a").train


MEASURED = EvalOutcome(10, 0.5, 0.8, 0.01)


class Harness:
    def __init__(self, outcome: EvalOutcome | None = MEASURED, fail: bool = False) -> None:
        self.eligible = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.evaluated: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self.outcome, self.fail = outcome, fail
        self.evaluations = Evaluations("a", Topics("f"), evaluate=self.evaluate, publish=self.publish, wait_eligible=self.eligible.wait)

    async def evaluate(self, model: GlobalModel, payload: bytes) -> EvalOutcome | None:
        await self.release.wait()
        self.evaluated.append(model.model_version)
        if self.fail:
            raise RuntimeError("task broke")
        return self.outcome

    async def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))


async def test_the_newest_request_wins_while_the_device_is_not_eligible_and_callbacks_run_once_served():
    h = Harness()
    done: list[int] = []
    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        runner = group.create_task(h.evaluations.run())
        h.evaluations.offer(announcement(1, None), b"", then=lambda: done.append(1))
        h.evaluations.offer(announcement(2, None), b"", then=lambda: done.append(2))
        assert done == [1]  # v1 was superseded before the device became eligible: never evaluated
        finished = asyncio.Event()
        h.evaluations.offer(announcement(2, None), b"", then=finished.set)
        h.eligible.set()
        await finished.wait()
        h.evaluations.offer(announcement(2, None), b"", then=lambda: done.append(22))  # already evaluated: at once
        runner.cancel()
    assert h.evaluated == [2] and done == [1, 22]
    [(topic, payload)] = h.published
    report = EvalReport.from_bytes(payload, fleet="f")
    assert topic == "fl/f/evals/a" and (report.model_version, report.num_samples, report.accuracy) == (2, 10, 0.8)


@pytest.mark.parametrize("harness", [Harness(outcome=None), Harness(fail=True), Harness(outcome=EvalOutcome(3, float("nan"), 0.5, 0.0))],
                         ids=["no-data", "task-fails", "nan-loss"])
async def test_nothing_is_published_when_there_is_nothing_to_report_and_the_loop_goes_on(harness):
    harness.eligible.set()
    served = asyncio.Event()
    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        runner = group.create_task(harness.evaluations.run())
        harness.evaluations.offer(announcement(1, None), b"", then=served.set)
        await served.wait()
        runner.cancel()
    assert harness.evaluated == [1] and harness.published == []

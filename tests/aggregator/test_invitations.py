"""A sync policy's cohorts (rounds/invitations.py): check-in, selection stored before it is announced,
restored after a restart, extension; against a real store (InlineStore: the calls run in the test's thread)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aggregator.rounds.cohort import CohortPolicy
from aggregator.rounds.invitations import SETTLE, Invitations
from aggregator.rounds.sync import RoundPlan, SyncPolicy
from aggregator.store import InlineStore, Store
from fedge_contract import Presence

pytestmark = pytest.mark.asyncio


@dataclass
class Fleet:
    fleet: str = "f"
    devices: dict[str, Presence] = field(default_factory=dict)

    def online(self, *clients: str, eligible: bool = True) -> None:
        for c in clients:
            self.devices[c] = Presence("f", c, "online", eligible=eligible)

    def offline(self, *clients: str) -> None:
        for c in clients:
            self.devices[c] = Presence("f", c, "offline")


def policy(fleet: Fleet, *, target: int = 10, checkin: float = 30.0, seed: int = 1) -> SyncPolicy:
    return SyncPolicy(RoundPlan(target=target, min_updates=1, timeout=60), Invitations(CohortPolicy(target, 1.3, seed), fleet, checkin=checkin))


async def test_check_in_waits_for_a_settled_fleet_of_at_least_the_target_or_its_time(tmp_path: Path):
    fleet = Fleet()
    with Store(tmp_path / "s.sqlite") as store:
        db = InlineStore(store)
        rounds = policy(fleet, target=10, checkin=30.0)
        assert await rounds.check_in(0, 100.0, db) == 130.0  # nobody there: wait until the check-in time is up
        fleet.online(*(f"d{i}" for i in range(10)))
        assert await rounds.check_in(0, 101.0, db) == 101.0 + SETTLE  # the target is there: settle, in case more are coming
        fleet.online("d10")
        assert await rounds.check_in(0, 101.2, db) == 101.2 + SETTLE  # one more came: settle again
        assert await rounds.check_in(0, 101.2 + SETTLE, db) is None  # settled with 11 of a cohort of 13
        fleet.online("d11", "d12")
        assert await rounds.check_in(1, 200.0, db) == 200.0 + SETTLE  # a burst of presence: select once it ended
        assert await rounds.check_in(1, 200.0 + SETTLE, db) is None
        assert await rounds.check_in(2, 250.0, db) is None  # a settled fleet: the next round selects at once
        fleet.offline(*(f"d{i}" for i in range(8)))
        assert await rounds.check_in(3, 300.0, db) == 330.0  # 5 online, below the target
        assert await rounds.check_in(3, 330.0, db) is None  # time is up: select from whoever is there
        assert await policy(fleet).check_in(0, 0.0, db) is not None
        assert await SyncPolicy(RoundPlan(10, 1, 60)).check_in(0, 0.0, db) is None  # no cohort: no check-in


async def test_selection_is_stored_before_it_is_announced_and_a_restart_resumes_it(tmp_path: Path):
    fleet = Fleet()
    fleet.online(*(f"d{i}" for i in range(40)))
    with Store(tmp_path / "s.sqlite") as store:
        db = InlineStore(store)
        first = await policy(fleet).open(4, 0.0, db)
        assert first.number == 5 and first.selection is not None and len(first.selection.invited) == 13
        assert store.invited(5) == sorted(first.selection.invited)
        announced = first.invitation()
        assert announced is not None and announced.count == 13
        assert {c for c in fleet.devices if announced.contains(c, fleet="f", round_no=5)} >= first.selection.invited
        fleet.devices.clear()  # after a restart the fleet view starts empty
        resumed = policy(fleet)
        assert await resumed.check_in(4, 0.0, db) is None  # the round was selected: no waiting
        again = await resumed.open(4, 0.0, db)
        assert again.selection == first.selection and again.invitation() == announced
    with Store(tmp_path / "s.sqlite") as store:
        assert store.invited(5) == sorted(first.selection.invited)


async def test_the_same_seed_selects_the_same_cohorts(tmp_path: Path):
    fleet = Fleet()
    fleet.online(*(f"d{i}" for i in range(100)))

    async def cohorts(folder: str, seed: int) -> list[frozenset[str]]:
        with Store(tmp_path / folder / "s.sqlite") as store:
            rounds = policy(fleet, seed=seed)
            return [(await rounds.open(v, 0.0, InlineStore(store))).selection.invited for v in range(5)]  # type: ignore[union-attr]

    assert await cohorts("a", 7) == await cohorts("b", 7) != await cohorts("c", 8)


async def test_an_extension_replaces_dropouts_with_new_devices(tmp_path: Path):
    fleet = Fleet()
    fleet.online(*(f"d{i}" for i in range(40)))
    with Store(tmp_path / "s.sqlite") as store:
        db = InlineStore(store)
        rnd = await policy(fleet, target=10).open(0, 0.0, db)
        first = rnd.selection
        assert first is not None
        invited = sorted(first.invited)
        rnd.clients.update(invited[:4])  # four answered
        rnd.update_ids.update(f"u{i}" for i in range(4))
        fleet.offline(*invited[4:])  # the nine others dropped out
        await rnd.extend(db)
        assert rnd.selection is not None and rnd.selection.invited > first.invited
        new = rnd.selection.invited - first.invited
        assert len(new) == 8 and all(fleet.devices[c].state == "online" for c in new)  # 6 missing x 1.3
        assert store.invited(1) == sorted(rnd.selection.invited)
        assert rnd.metrics()["invited"] == 21.0


async def test_a_round_short_of_its_cohort_invites_newcomers_at_most_every_second(tmp_path: Path):
    fleet = Fleet()
    fleet.online("d0", "d1")
    with Store(tmp_path / "s.sqlite") as store:
        db = InlineStore(store)
        rnd = await policy(fleet, target=4).open(0, 0.0, db)  # a cohort of 6, two online
        assert rnd.selection is not None and rnd.selection.invited == {"d0", "d1"}
        fleet.online("d2", "d3")
        fleet.offline("d9")
        assert await rnd.invite_newcomers(db, 10.0) and rnd.selection.invited == {"d0", "d1", "d2", "d3"}
        fleet.online("d4", "d5", "d6")
        assert not await rnd.invite_newcomers(db, 10.5)  # within a second of the last top-up
        assert await rnd.invite_newcomers(db, 11.0) and len(rnd.selection.invited) == 6
        assert store.invited(1) == sorted(rnd.selection.invited)
        assert not await rnd.invite_newcomers(db, 20.0)  # full: never again

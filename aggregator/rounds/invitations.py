"""A sync policy's cohorts: who each round invites, chosen from the fleet view when the round opens.

The selection rule is pure (rounds/cohort.py); this is its place in the round loop:

- **Check-in.** A round selects once at least ``target`` devices are online and none came online
  for ``SETTLE`` seconds, or after ``checkin`` seconds with whoever is there. Without it the first
  round of every run would select from an empty fleet view: the aggregator opens it before the
  retained presence of the devices has arrived, and that burst must end before the draw, or the
  same fleet would give different cohorts. Later rounds find the fleet settled and select at once.
  The devices' retained presence *is* their check-in: nothing is sent per device beyond what they
  already publish.
- **Selection** at the round's opening, from the fleet view's devices (``FleetView``: each one's
  last presence, with its eligibility). The invited set and the selector's state are written to
  the store in one durable transaction *before* the announcement: admission (rounds/sync.py)
  reads the set in its ledger transaction, in this process or an ingest worker's, and a restarted
  aggregator restores the state and announces the same cohort for the round it resumes.
- **Newcomers.** A round that opened with fewer devices than its cohort (few had checked in when
  the check-in time was up) invites the devices that come online meanwhile, at most every
  ``TOP_UP_EVERY`` seconds, each top-up re-announced: an aggregator started before its fleet
  trains as soon as the devices arrive. A round with its full cohort never does this.
- **Extension.** At a deadline short of ``min_updates`` the round invites enough new devices that
  the invited ones still expected (online, no update yet) are ``over_select`` x the updates
  missing; written to the store before the re-announcement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from aggregator.rounds.cohort import CohortPolicy, CohortSelector, Selection, candidates, extension_size
from aggregator.rounds.policy import Sampling
from aggregator.store import Store, StoreAccess, call
from fedge_contract import Presence
from fedge_contract.cohort import InviteSet, invite_bits

SETTLE = 0.5  # seconds without a device joining before a fleet smaller than the cohort is taken as complete
TOP_UP_EVERY = 1.0  # seconds: a round short of its cohort looks for newcomers (and is re-announced) at most this often


class Fleet(Protocol):
    """What selection reads of the fleet (aggregator/observability/fleet.py's FleetView)."""

    fleet: str

    @property
    def devices(self) -> Mapping[str, Presence]: ...


class Invitations:
    """Selects, extends and persists the cohorts of one aggregator's sync rounds (see the module docstring)."""

    def __init__(self, policy: CohortPolicy, fleet: Fleet, *, checkin: float) -> None:
        self.policy = policy
        self.fleet = fleet
        self.checkin = checkin
        self._selector: CohortSelector | None = None  # restored from the store on first use
        self._waiting: tuple[int, float] | None = None  # (round, when its check-in began)
        self._online = 0  # online devices at the last check-in call
        self._joined: float | None = None  # when a device last came online (check-in)
        self._topped = float("-inf")  # when a short round last looked for newcomers

    async def selector(self, db: StoreAccess) -> CohortSelector:
        if self._selector is None:
            self._selector = CohortSelector.from_state(self.policy, await call(db, Store.cohort_state))
        return self._selector

    async def check_in(self, round_no: int, now: float, db: StoreAccess) -> float | None:
        """None once ``round_no`` may select its cohort; else the time until which it waits for devices to check in."""
        current = (await self.selector(db)).current
        if current is not None and current.round >= round_no:
            return None  # selected before a restart: resumed as it was
        online = sum(1 for p in self.fleet.devices.values() if p.state == "online")
        if self._joined is None or online > self._online:
            self._joined = now
        self._online = online
        if self._waiting is None or self._waiting[0] != round_no:
            self._waiting = (round_no, now)
        ends = self._waiting[1] + self.checkin
        if now >= ends:
            return None
        if online >= self.policy.target:
            settled = self._joined + SETTLE
            return None if now >= settled else min(ends, settled)
        return ends

    async def select(self, round_no: int, db: StoreAccess) -> Selection:
        """The cohort of ``round_no``: the one the store holds (a resumed round), or a new one, stored before it is announced."""
        selector = await self.selector(db)
        if selector.current is not None and selector.current.round == round_no:
            return selector.current
        selection = selector.select(round_no, candidates(self.fleet.devices))
        await call(db, Store.invite, round_no, sorted(selection.invited), selector.to_state())
        return selection

    async def extend(self, selection: Selection, contributed: set[str], accepted: int, db: StoreAccess) -> Selection:
        """Invite more devices into ``selection``'s round (a deadline short of its minimum); stored before it is re-announced."""
        selector = await self.selector(db)
        devices = self.fleet.devices
        outstanding = sum(1 for c in selection.invited - contributed if (p := devices.get(c)) is not None and p.state == "online")
        extended = selector.extend(selection.round, candidates(devices), extension_size(self.policy, accepted, outstanding))
        if extended is not selection:
            await call(db, Store.invite, extended.round, sorted(extended.invited - selection.invited), selector.to_state())
        return extended

    async def top_up(self, selection: Selection, now: float, db: StoreAccess) -> Selection:
        """A round that selected fewer devices than its cohort (few were online when it opened) invites online
        newcomers, at most every TOP_UP_EVERY seconds (each top-up is a re-announcement)."""
        missing = self.policy.size - len(selection.invited)
        if missing <= 0 or now - self._topped < TOP_UP_EVERY:
            return selection
        self._topped = now
        online = [c for c in candidates(self.fleet.devices) if c.online and c.client_id not in selection.invited]
        if not online:
            return selection
        selector = await self.selector(db)
        extended = selector.extend(selection.round, online, missing)
        if extended is not selection:
            await call(db, Store.invite, extended.round, sorted(extended.invited - selection.invited), selector.to_state())
        return extended

    def announced(self, selection: Selection) -> InviteSet:
        """The announcement's set, its precision set by the pool it was drawn from (fedge_contract/cohort.py):
        a function of the stored selection alone, so a resumed round announces the very same bytes."""
        population = max(selection.pool, len(selection.invited), 1)
        return InviteSet.of(selection.invited, fleet=self.fleet.fleet, round_no=selection.round,
                            bits=invite_bits(population, self.policy.false_invites))

    def sampling(self) -> Sampling:
        """Each selected round's sampling rate and the most invitations of one device (DP accounting)."""
        selector = self._selector
        if selector is None:
            return Sampling({}, 0)
        return Sampling(dict(selector.rates), selector.max_invitations())

"""A restarted aggregator resumes a session from its snapshot and spool without counting anything twice,
or refuses to (ResumeError), and a retry is a new session."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedge_contract.errors import Reason
from fedge_contract.secagg import Abandoned, Aggregate, Phase, ProtocolError, ResumeError, ServerSession
from tests.contract.secagg.relay import Dropouts, Relay, crash_and_restore, make_setup, random_inputs, ring_sum


def _stored(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as it comes back from disk: plain values survive msgpack unchanged."""
    restored: dict[str, Any] = msgpack.unpackb(msgpack.packb(snapshot, use_bin_type=True), raw=False)
    assert restored == snapshot
    return restored


def _relay(n: int = 24) -> Relay:
    setup = make_setup(n, degree=8, threshold=5)
    c = setup.cohort
    dropouts = Dropouts(
        before_keys=frozenset(c[3:4]), after_keys=frozenset(c[:1]), after_shares=frozenset(c[1:2]), after_masked=frozenset(c[2:3]),
    )
    return Relay(setup, random_inputs(setup), dropouts)  # one lost in each phase: every phase waits for its deadline


def _advance(relay: Relay, phase: Phase) -> None:
    """Until ``phase`` has taken its first messages (it then waits for the one lost device)."""
    for _ in range(20):
        relay.step()
        if relay.server.phase is phase:
            return
    raise AssertionError(f"never reached {phase}")


def _expected(relay: Relay) -> np.ndarray:
    return ring_sum(relay.setup, relay.inputs, relay.dropouts.expected_survivors(relay.setup.cohort))


@pytest.mark.parametrize("phase", [Phase.ADVERTISE, Phase.SHARE, Phase.MASK, Phase.UNMASK])
def test_a_server_restarted_in_any_phase_finishes_with_the_exact_sum(phase: Phase) -> None:
    relay = _relay()
    _advance(relay, phase)
    assert relay.server.waiting_for()  # mid-phase: some answers in, one still awaited
    crash_and_restore(relay, _stored(relay.server.snapshot()))
    assert relay.server.phase is phase
    outcome = relay.run()
    assert isinstance(outcome, Aggregate)
    assert np.array_equal(outcome.total, _expected(relay))


def test_a_snapshot_from_before_later_masked_inputs_takes_them_from_the_spool() -> None:
    relay = _relay()
    while relay.server.phase is not Phase.MASK:  # the phase has just begun: bundles in flight, no masked input yet
        relay.step()
    early = relay.server.snapshot()
    assert not early["masked"]
    relay.step()  # the masked inputs arrive and are spooled; the phase waits for the lost one
    assert relay.server.phase is Phase.MASK and len(relay.spool) == 21
    crash_and_restore(relay, _stored(early))
    assert relay.server.waiting_for() == (relay.setup.cohort[1],)  # all 21 taken from the spool
    outcome = relay.run()
    assert isinstance(outcome, Aggregate) and np.array_equal(outcome.total, _expected(relay))


def test_resent_masked_inputs_in_the_spool_are_counted_once() -> None:
    relay = _relay()
    _advance(relay, Phase.UNMASK)
    snapshot = _stored(relay.server.snapshot())
    crash_and_restore(relay, snapshot, spool=relay.spool + relay.spool[::-1])
    outcome = relay.run()
    assert isinstance(outcome, Aggregate) and np.array_equal(outcome.total, _expected(relay))


def test_a_finished_session_restores_to_the_same_result() -> None:
    relay = _relay()
    first = relay.run()
    assert isinstance(first, Aggregate)
    again = ServerSession.restore(_stored(relay.server.snapshot()), relay.spool, now=relay.now)
    assert isinstance(again.outcome, Aggregate) and again.phase is Phase.DONE
    assert np.array_equal(again.outcome.total, first.total) and again.outcome.survivors == first.survivors


def test_an_abandoned_session_restores_abandoned() -> None:
    setup = make_setup(10, degree=4, threshold=3, min_survivors=8)
    relay = Relay(setup, random_inputs(setup), Dropouts(after_shares=frozenset(setup.cohort[:4])))
    outcome = relay.run()
    assert isinstance(outcome, Abandoned)
    again = ServerSession.restore(_stored(relay.server.snapshot()), [], now=0.0)
    assert again.outcome == outcome and again.phase is Phase.ABANDONED


def _in_unmask() -> tuple[Relay, dict[str, Any]]:
    relay = _relay()
    _advance(relay, Phase.UNMASK)
    return relay, _stored(relay.server.snapshot())


def test_a_spool_without_a_counted_input_is_refused() -> None:
    relay, snapshot = _in_unmask()
    with pytest.raises(ResumeError, match="lacks"):
        ServerSession.restore(snapshot, relay.spool[1:], now=0.0)


def test_a_spool_with_another_input_than_the_one_counted_is_refused() -> None:
    relay, snapshot = _in_unmask()
    first = relay.spool[0]
    forged = type(first)(fleet=first.fleet, round=first.round, session=first.session, sender=first.sender,
                         bits=first.bits, length=first.length, data=bytes(len(first.data)))
    with pytest.raises(ResumeError, match="not the one"):
        ServerSession.restore(snapshot, [forged, *relay.spool[1:]], now=0.0)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.pop("phase"),
        lambda s: s.update(version=99),
        lambda s: s.update(phase="nonsense"),
        lambda s: s.update(setup=b"{}"),
        lambda s: s.update(adverts=[b"\x00garbage"]),
        lambda s: s.update(graph_seed=b"short"),
        lambda s: s.update(reveals=[s["adverts"][0]]),  # a message of the wrong type
        lambda s: s.update(sharers=None),
    ],
)
def test_a_damaged_snapshot_is_refused(damage: Any) -> None:
    relay, snapshot = _in_unmask()
    damage(snapshot)
    with pytest.raises(ResumeError):
        ServerSession.restore(snapshot, relay.spool, now=0.0)


def test_a_snapshot_of_another_session_s_messages_is_refused() -> None:
    other, _ = _in_unmask()
    other_snapshot = other.server.snapshot()
    other_snapshot["setup"] = make_setup(24, degree=8, threshold=5, seed=99).to_bytes()  # same cohort, another session id
    with pytest.raises(ResumeError):
        ServerSession.restore(other_snapshot, other.spool, now=0.0)


def test_a_retry_is_a_new_session_and_the_old_one_s_messages_are_refused() -> None:
    """What a coordinator does when it cannot resume: a new session id, fresh keys on every device."""
    old = _relay()
    _advance(old, Phase.MASK)
    retry_setup = make_setup(24, degree=8, threshold=5, seed=1)
    assert retry_setup.session != old.setup.session and retry_setup.round == old.setup.round
    retry = Relay(retry_setup, old.inputs)
    outcome = retry.run()
    assert isinstance(outcome, Aggregate) and np.array_equal(outcome.total, ring_sum(retry_setup, old.inputs, retry_setup.cohort))
    late = old.devices[old.setup.cohort[5]].advertisement()
    with pytest.raises(ProtocolError) as refused:
        retry.server.handle(late, now=0.0)
    assert refused.value.reason is Reason.WRONG_SESSION
    with pytest.raises(ProtocolError) as refused:
        old.devices[old.setup.cohort[5]].handle(retry.server.setup)
    assert refused.value.reason is Reason.WRONG_SESSION

"""The server side of the protocol as a pure state machine: no I/O, no clock, time and randomness injected.

The aggregator's coordinator feeds it the device messages it receives (``handle``) and the time
(``poll``), and sends what they return; ``pending()`` is what the current phase has sent, to send
again after a restart. Each phase ends when every device still expected has answered, or at its
deadline; then the server decides who is still in:

    advertise  U1 = the invited devices that advertised keys; the graph is drawn over U1
    share      U2 = the largest part of U1 whose sealed shares came in and in which every device
               keeps at least ``threshold`` neighbours (pruned until it holds)
    mask       U3 = the devices of U2 whose masked input came in
    unmask     the survivors' answers: every survivor's mask seed and every dropped device's mask
               key is rebuilt from ``threshold`` shares and checked against its commitment / public key

and at the end outputs the sum of U3's inputs in the ring (``Aggregate``), or, when too few remain
at any point, abandons the session with a reason (``Abandoned``): nothing partial is ever output.

What it holds never reveals one device's input: masked inputs only (folded into one running sum as
they arrive), sealed boxes it cannot open (dropped once relayed), and in the last phase shares of
the survivors' seeds and the dropped devices' keys, never both for one device. ``snapshot()`` is
that state as plain values without the vectors; ``restore`` rebuilds it from a snapshot and the
spooled masked inputs (DESIGN.md, restarts).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge_contract.errors import ContractError, Reason
from fedge_contract.secagg import crypto, masks, shamir
from fedge_contract.secagg.crypto import Randomness
from fedge_contract.secagg.errors import ProtocolError, ResumeError
from fedge_contract.secagg.graph import SEED_BYTES, Graph
from fedge_contract.secagg.messages import (
    DeviceMessage,
    KeyAdvert,
    KeyList,
    MaskedInput,
    PeerKeys,
    Reveal,
    SealedShare,
    ServerMessage,
    Setup,
    ShareBundle,
    Shares,
    UnmaskRequest,
)

SNAPSHOT_VERSION = 1


class Phase(str, enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASK = "mask"
    UNMASK = "unmask"
    DONE = "done"
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class PhaseTimeouts:
    """Seconds each phase waits for stragglers; the mask phase includes the devices' training."""

    advertise: float = 30.0
    share: float = 30.0
    mask: float = 300.0
    unmask: float = 30.0

    def of(self, phase: Phase) -> float:
        return float(getattr(self, phase.value, 0.0))


@dataclass(frozen=True)
class Aggregate:
    """The session's result: the ring sum of the survivors' inputs."""

    total: np.ndarray
    count: int
    survivors: tuple[str, ...]


@dataclass(frozen=True)
class Abandoned:
    """Why a session produced nothing; the round may be retried with a new session."""

    phase: Phase  # the phase whose end (or whose input) ended it
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Step:
    """The result of handling one device message: ``accepted`` False for a repeat of one already taken."""

    accepted: bool
    send: tuple[ServerMessage, ...] = ()


def new_session_id(random: Randomness = os.urandom) -> str:
    """A fresh session name: 96 random bits, 16 URL-safe characters (a valid topic level)."""
    return base64.urlsafe_b64encode(random(12)).decode()


class ServerSession:
    def __init__(
        self, setup: Setup, *, now: float, random: Randomness = os.urandom, timeouts: PhaseTimeouts = PhaseTimeouts(),
    ) -> None:
        self.setup = setup
        self.timeouts = timeouts
        self._random = random
        self._context = setup.context
        self._cohort = frozenset(setup.cohort)
        self.phase = Phase.ADVERTISE
        self.deadline = now + timeouts.advertise
        self.outcome: Aggregate | Abandoned | None = None
        self._adverts: dict[str, KeyAdvert] = {}
        self._graph: Graph | None = None
        self._shares: dict[str, Shares] = {}
        self._sharers: tuple[str, ...] = ()  # U2
        self._commitments: dict[str, bytes] = {}
        self._masked: dict[str, bytes] = {}  # sender -> SHA-256 of its masked input's data
        self._total: np.ndarray | None = setup.ring.zeros(setup.length)
        self._survivors: tuple[str, ...] = ()  # U3
        self._reveals: dict[str, Reveal] = {}

    # ---------------------------------------------------------------- what the coordinator calls

    @property
    def members(self) -> tuple[str, ...]:
        """U1: who advertised keys (empty until the advertise phase ends)."""
        return self._graph.members if self._graph is not None else ()

    @property
    def survivors(self) -> tuple[str, ...]:
        """U3: whose masked input is in the sum (empty until the mask phase ends)."""
        return self._survivors

    def waiting_for(self) -> tuple[str, ...]:
        """Who the current phase still waits for."""
        expected, got = self._expected(), self._received()
        return tuple(sorted(set(expected) - set(got)))

    def pending(self) -> tuple[ServerMessage, ...]:
        """What the current phase has sent (to send again after a restart or for a device that reconnects)."""
        if self.phase is Phase.ADVERTISE:
            return (self.setup,)
        if self.phase is Phase.SHARE:
            return tuple(self._key_list(m) for m in self.members)
        if self.phase is Phase.MASK:
            return tuple(self._bundle(v) for v in self._sharers)
        if self.phase is Phase.UNMASK:
            return (self._unmask_request(),)
        return ()

    def handle(self, message: DeviceMessage, *, now: float) -> Step:
        """Take one device message; ProtocolError (state unchanged) if the protocol refuses it."""
        self._check_session(message)
        if isinstance(message, KeyAdvert):
            accepted = self._on_advert(message)
        elif isinstance(message, Shares):
            accepted = self._on_shares(message)
        elif isinstance(message, MaskedInput):
            accepted = self._on_masked(message)
        else:
            accepted = self._on_reveal(message)
        if accepted and len(self._received()) == len(self._expected()):
            return Step(True, self._close(now))
        return Step(accepted)

    def poll(self, *, now: float) -> tuple[ServerMessage, ...]:
        """End the current phase if its deadline has passed; what to send next."""
        if self.outcome is None and now >= self.deadline:
            return self._close(now)
        return ()

    # ---------------------------------------------------------------- incoming

    def _check_session(self, message: DeviceMessage) -> None:
        setup = self.setup
        if (message.fleet, message.round, message.session) != (setup.fleet, setup.round, setup.session):
            raise ProtocolError(
                Reason.WRONG_SESSION,
                f"{message.TYPE} for round {message.round} session {message.session}, not round {setup.round} session {setup.session}",
                sender=message.sender,
            )
        if message.sender not in self._cohort:
            raise ProtocolError(Reason.NOT_IN_ROUND, f"{message.sender} is not in the cohort", sender=message.sender)

    def _in_phase(self, phase: Phase, message: DeviceMessage, taken: bool) -> bool:
        """Whether ``message`` may be taken now; False for a repeat of one taken, which is not an error."""
        if taken:
            return False
        if self.phase is not phase:
            raise ProtocolError(
                Reason.WRONG_PHASE, f"{message.TYPE} from {message.sender} in the {self.phase.value} phase", sender=message.sender,
            )
        return True

    def _repeat(self, message: DeviceMessage, earlier: object, same: bool) -> bool:
        """Whether ``message`` repeats what its sender already sent; a different second message is refused."""
        if earlier is None:
            return False
        if not same:
            raise ProtocolError(Reason.CONFLICT, f"a second, different {message.TYPE} from {message.sender}", sender=message.sender)
        return True

    def _on_advert(self, message: KeyAdvert) -> bool:
        earlier = self._adverts.get(message.sender)
        if not self._in_phase(Phase.ADVERTISE, message, self._repeat(message, earlier, message == earlier)):
            return False
        keys = {k for a in self._adverts.values() for k in (a.cipher_key, a.mask_key)}
        if message.cipher_key == message.mask_key or {message.cipher_key, message.mask_key} & keys:
            raise ProtocolError(Reason.CONFLICT, f"{message.sender} advertised a public key already in use", sender=message.sender)
        for key in (message.cipher_key, message.mask_key):  # a low-order key would make every neighbour refuse
            crypto.check_public_key(key, peer=message.sender)
        self._adverts[message.sender] = message
        return True

    def _on_shares(self, message: Shares) -> bool:
        earlier = self._shares.get(message.sender)
        if not self._in_phase(Phase.SHARE, message, self._repeat(message, earlier, message == earlier)):
            return False
        graph = self._require_graph()
        if message.sender not in graph.members:
            raise ProtocolError(Reason.NOT_IN_ROUND, f"{message.sender} did not advertise keys in time", sender=message.sender)
        recipients = {b.peer for b in message.boxes}
        if recipients != graph.neighbours(message.sender):
            raise ProtocolError(
                Reason.GRAPH_MISMATCH, f"{message.sender}'s boxes are not addressed to exactly its neighbours", sender=message.sender,
            )
        self._shares[message.sender] = message
        return True

    def _on_masked(self, message: MaskedInput) -> bool:
        digest = hashlib.sha256(message.data).digest()
        earlier = self._masked.get(message.sender)
        if not self._in_phase(Phase.MASK, message, self._repeat(message, earlier, digest == earlier)):
            return False
        if message.sender not in self._sharers:
            raise ProtocolError(Reason.NOT_IN_ROUND, f"{message.sender} is not among the devices that shared keys", sender=message.sender)
        ring = self.setup.ring
        if message.bits != ring.bits or message.length != self.setup.length:
            raise ProtocolError(
                Reason.SHAPE_MISMATCH,
                f"masked input of {message.length} x {message.bits} bits, the session's is {self.setup.length} x {ring.bits}",
                sender=message.sender,
            )
        self._fold(message, digest)
        return True

    def _fold(self, message: MaskedInput, digest: bytes) -> None:
        ring = self.setup.ring
        self._total = ring.add(self._require_total(), ring.from_bytes(message.data, message.length))
        self._masked[message.sender] = digest

    def _on_reveal(self, message: Reveal) -> bool:
        earlier = self._reveals.get(message.sender)
        if not self._in_phase(Phase.UNMASK, message, self._repeat(message, earlier, message == earlier)):
            return False
        if message.sender not in self._survivors:
            raise ProtocolError(Reason.NOT_IN_ROUND, f"{message.sender} is not among the survivors", sender=message.sender)
        for r in message.seeds + message.keys:
            shamir.share_from_bytes(r.share, what=f"reveal from {message.sender}")
        partners = self._partners(message.sender)
        survivors = set(self._survivors)
        seeds, keys = {r.peer for r in message.seeds}, {r.peer for r in message.keys}
        if seeds != partners & survivors or keys != partners - survivors:
            raise ProtocolError(
                Reason.GRAPH_MISMATCH,
                f"{message.sender} revealed shares for other devices than its surviving (seeds) and dropped (keys) partners",
                sender=message.sender,
            )
        self._reveals[message.sender] = message
        return True

    # ---------------------------------------------------------------- phase ends

    def _expected(self) -> tuple[str, ...]:
        return {
            Phase.ADVERTISE: self.setup.cohort, Phase.SHARE: self.members, Phase.MASK: self._sharers,
            Phase.UNMASK: self._survivors,
        }.get(self.phase, ())

    def _received(self) -> Collection[str]:
        """Who answered the current phase: always a subset of ``_expected()``."""
        if self.phase is Phase.ADVERTISE:
            return self._adverts.keys()
        if self.phase is Phase.SHARE:
            return self._shares.keys()
        if self.phase is Phase.MASK:
            return self._masked.keys()
        if self.phase is Phase.UNMASK:
            return self._reveals.keys()
        return ()

    def _close(self, now: float) -> tuple[ServerMessage, ...]:
        closing = self.phase
        try:
            {
                Phase.ADVERTISE: self._close_advertise, Phase.SHARE: self._close_share,
                Phase.MASK: self._close_mask, Phase.UNMASK: self._close_unmask,
            }[closing]()
        except ProtocolError as exc:
            self._abandon(closing, exc.reason, exc.detail)
            return ()
        if self.outcome is None:
            self.deadline = now + self.timeouts.of(self.phase)
        return self.pending()

    def _abandon(self, phase: Phase, reason: Reason, detail: str) -> None:
        self.outcome = Abandoned(phase, reason, detail)
        self.phase = Phase.ABANDONED
        self._total = None
        self._shares.clear()
        self._reveals.clear()

    def _enough(self, count: int, what: str) -> None:
        if count < self.setup.min_survivors:
            raise ProtocolError(Reason.BELOW_THRESHOLD, f"{count} {what}, fewer than min_survivors {self.setup.min_survivors}")

    def _close_advertise(self) -> None:
        members = tuple(sorted(self._adverts))
        self._enough(len(members), "devices advertised keys")
        if min(self.setup.degree, len(members) - 1) < self.setup.threshold:
            raise ProtocolError(Reason.BELOW_THRESHOLD, f"{len(members)} devices give no one threshold {self.setup.threshold} neighbours")
        self._graph = Graph(members, self.setup.degree, self._random(SEED_BYTES))
        self.phase = Phase.SHARE

    def _close_share(self) -> None:
        graph = self._require_graph()
        sharers = set(self._shares)
        while True:  # keep only devices with >= threshold sharing neighbours: the others' secrets could never be rebuilt
            weak = {v for v in sharers if len(graph.neighbours(v) & sharers) < self.setup.threshold}
            if not weak:
                break
            sharers -= weak
        self._enough(len(sharers), "devices shared keys with enough neighbours")
        self._sharers = tuple(sorted(sharers))
        self._commitments = {v: self._shares[v].seed_commitment for v in self._sharers}
        self.phase = Phase.MASK

    def _close_mask(self) -> None:
        graph = self._require_graph()
        survivors = set(self._masked)
        self._enough(len(survivors), "masked inputs")
        for device in self._sharers:  # whose secret the unmask phase must rebuild, from survivors' shares only
            holders = len(graph.neighbours(device) & survivors)
            needed = device in survivors or holders > 0
            if needed and holders < self.setup.threshold:
                raise ProtocolError(
                    Reason.BELOW_THRESHOLD,
                    f"{device}'s secret is held by {holders} surviving neighbours, threshold {self.setup.threshold}",
                )
        self._survivors = tuple(sorted(survivors))
        self._shares.clear()  # relayed: the boxes are of no further use
        self.phase = Phase.UNMASK

    def _close_unmask(self) -> None:
        graph = self._require_graph()
        setup, context, ring = self.setup, self._context, self.setup.ring
        total = self._require_total().copy()
        seeds, keys = self._revealed()
        for device in self._survivors:
            seed = shamir.reconstruct(seeds.get(device, {}), setup.threshold, what=f"{device}'s mask seed")
            if masks.seed_commitment(context, seed, device) != self._commitments[device]:
                raise ProtocolError(Reason.BAD_SHARE, f"{device}'s rebuilt mask seed does not match its commitment")
            total -= masks.self_mask(context, seed, device, ring, setup.length)
        survivors = set(self._survivors)
        for device in sorted(set(self._sharers) - survivors):
            partners = graph.neighbours(device) & survivors
            if not partners:
                continue
            key = shamir.reconstruct(keys.get(device, {}), setup.threshold, what=f"{device}'s mask key")
            if crypto.public_key_of(key) != self._adverts[device].mask_key:
                raise ProtocolError(Reason.BAD_SHARE, f"{device}'s rebuilt mask key does not match its advertised key")
            for survivor in sorted(partners):
                shared = crypto.agree(key, self._adverts[survivor].mask_key, peer=survivor)
                mask = masks.pair_mask(context, shared, survivor, device, ring, setup.length)
                if masks.adds_pair_mask(survivor, device):
                    total -= mask
                else:
                    total += mask
        self.outcome = Aggregate(ring.reduce(total), len(self._survivors), self._survivors)
        self.phase = Phase.DONE
        self._total = None  # the reveals stay: with the spool, they let a restored session recompute the result

    def _revealed(self) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]:
        """The revealed shares by whose secret they are: (mask seeds, mask keys), each device -> {x: y}."""
        graph = self._require_graph()
        seeds: dict[str, dict[int, int]] = {}
        keys: dict[str, dict[int, int]] = {}
        for holder, reveal in self._reveals.items():
            x = graph.index(holder)
            for kind, revealed in ((seeds, reveal.seeds), (keys, reveal.keys)):
                for r in revealed:
                    kind.setdefault(r.peer, {})[x] = shamir.share_from_bytes(r.share, what=f"reveal from {holder}")
        return seeds, keys

    # ---------------------------------------------------------------- outgoing

    def _require_total(self) -> np.ndarray:
        if self._total is None:
            raise ProtocolError(Reason.WRONG_PHASE, f"the session is {self.phase.value}: it holds no running sum")
        return self._total

    def _require_graph(self) -> Graph:
        if self._graph is None:
            raise ProtocolError(Reason.WRONG_PHASE, "the advertise phase has not ended")
        return self._graph

    def _partners(self, device: str) -> set[str]:
        """The devices ``device`` exchanged shares (and masks) with: its neighbours among U2."""
        return set(self._require_graph().neighbours(device) & set(self._sharers))

    def _key_list(self, member: str) -> KeyList:
        graph = self._require_graph()
        setup = self.setup
        peers = tuple(
            PeerKeys(p, self._adverts[p].cipher_key, self._adverts[p].mask_key) for p in sorted(graph.neighbours(member))
        )
        return KeyList(
            fleet=setup.fleet, round=setup.round, session=setup.session, sender=setup.sender,
            recipient=member, members=graph.members, graph_seed=graph.seed, peers=peers,
        )

    def _bundle(self, device: str) -> ShareBundle:
        setup = self.setup
        boxes = tuple(
            SealedShare(sender, box.box)
            for sender in sorted(self._partners(device))
            for box in self._shares[sender].boxes
            if box.peer == device
        )
        return ShareBundle(fleet=setup.fleet, round=setup.round, session=setup.session, sender=setup.sender, recipient=device, boxes=boxes)

    def _unmask_request(self) -> UnmaskRequest:
        setup = self.setup
        dropped = tuple(sorted(set(self._sharers) - set(self._survivors)))
        return UnmaskRequest(
            fleet=setup.fleet, round=setup.round, session=setup.session, sender=setup.sender,
            survivors=self._survivors, dropped=dropped,
        )

    # ---------------------------------------------------------------- restarts

    def snapshot(self) -> dict[str, Any]:
        """The session's state as plain values (bytes, str, int, lists, maps), without any vector.

        Messages are kept as their wire bytes, so ``restore`` re-reads them through the strict decoders.
        The running sum is not in it: ``restore`` folds the spooled masked inputs again, checking each
        against the digest kept here, so none is counted twice or replaced.
        """
        return {
            "version": SNAPSHOT_VERSION,
            "setup": self.setup.to_bytes(),
            "phase": self.phase.value,
            "adverts": [a.to_bytes() for a in self._adverts.values()],
            "graph_seed": self._graph.seed if self._graph is not None else None,
            "shares": [s.to_bytes() for s in self._shares.values()],
            "sharers": list(self._sharers),
            "commitments": dict(self._commitments),
            "masked": dict(self._masked),
            "survivors": list(self._survivors),
            "reveals": [r.to_bytes() for r in self._reveals.values()],
            "abandoned": (
                {"phase": self.outcome.phase.value, "reason": self.outcome.reason.value, "detail": self.outcome.detail}
                if isinstance(self.outcome, Abandoned) else None
            ),
        }

    @classmethod
    def restore(
        cls, snapshot: Mapping[str, Any], masked_inputs: Iterable[MaskedInput], *, now: float,
        random: Randomness = os.urandom, timeouts: PhaseTimeouts = PhaseTimeouts(),
    ) -> ServerSession:
        """The session ``snapshot`` was taken of, its running sum rebuilt from ``masked_inputs`` (the spool).

        Every phase gets a fresh deadline from ``now``: devices need time to answer the resent
        ``pending()`` messages. A session that was done is done again, its result recomputed. ResumeError
        when the snapshot does not decode or the spool lacks, or differs from, an input the snapshot counted.
        """
        try:
            session = cls._from_snapshot(snapshot, now=now, random=random, timeouts=timeouts)
        except (KeyError, TypeError, ValueError, ContractError) as exc:
            raise ResumeError(f"the snapshot cannot be resumed ({type(exc).__name__}: {exc})") from None
        counted = dict(snapshot["masked"])
        later = session._refold(masked_inputs, counted)
        for message in later:  # spooled after the snapshot, still in the mask phase: take them as new
            try:
                session.handle(message, now=now)
            except ProtocolError:
                continue
        if session.phase is Phase.DONE:
            session.phase = Phase.UNMASK
            session._close(now)
        return session

    @classmethod
    def _from_snapshot(cls, snapshot: Mapping[str, Any], *, now: float, random: Randomness, timeouts: PhaseTimeouts) -> ServerSession:
        if snapshot["version"] != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {snapshot['version']}, this build reads {SNAPSHOT_VERSION}")
        setup = Setup.from_bytes(snapshot["setup"])
        session = cls(setup, now=now, random=random, timeouts=timeouts)
        fleet = setup.fleet
        session._adverts = {a.sender: a for a in (KeyAdvert.from_bytes(b, fleet=fleet) for b in snapshot["adverts"])}
        if snapshot["graph_seed"] is not None:
            session._graph = Graph(tuple(sorted(session._adverts)), setup.degree, snapshot["graph_seed"])
        session._shares = {s.sender: s for s in (Shares.from_bytes(b, fleet=fleet) for b in snapshot["shares"])}
        session._sharers = tuple(str(v) for v in snapshot["sharers"])
        session._commitments = {str(k): bytes(v) for k, v in snapshot["commitments"].items()}
        session._survivors = tuple(str(v) for v in snapshot["survivors"])
        session._reveals = {r.sender: r for r in (Reveal.from_bytes(b, fleet=fleet) for b in snapshot["reveals"])}
        session.phase = Phase(snapshot["phase"])
        session.deadline = now + timeouts.of(session.phase)
        abandoned = snapshot["abandoned"]
        if abandoned is not None:
            session._abandon(Phase(abandoned["phase"]), Reason(abandoned["reason"]), str(abandoned["detail"]))
        stored: list[DeviceMessage] = [*session._adverts.values(), *session._shares.values(), *session._reveals.values()]
        for message in stored:
            session._check_session(message)
        return session

    def _refold(self, masked_inputs: Iterable[MaskedInput], counted: Mapping[str, bytes]) -> list[MaskedInput]:
        """Fold again the spooled inputs the snapshot counted; return the ones it did not."""
        later = []
        for message in masked_inputs:
            digest = hashlib.sha256(message.data).digest()
            if message.sender not in counted:
                later.append(message)
            elif message.sender not in self._masked and self._total is not None:
                if digest != counted[message.sender]:
                    raise ResumeError(f"the spooled masked input of {message.sender} is not the one the snapshot counted")
                self._check_session(message)
                self._fold(message, digest)
        missing = set(counted) - set(self._masked)
        if missing and self._total is not None:
            raise ResumeError(f"the spool lacks the masked inputs of {sorted(missing)}")
        return later if self.phase is Phase.MASK else []

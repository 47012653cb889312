"""The device side of the protocol as a pure state machine: messages in, messages out, no I/O, no clock.

One ``DeviceSession`` per protocol session. The agent feeds it what arrives on its topics
(``handle``) and its fixed-point input when training is done (``submit``), and publishes what it
returns. Everything it refuses raises ProtocolError with a reason, leaving its state as it was;
a repeat of a message it already answered gets the same answer again (so resends are safe), a
different message for the same phase is refused (``conflict``): a device answers each phase once.

What a device checks before it answers, because answering wrongly could expose its input:
- the setup: it is invited, the sum will hold at least ``min_survivors`` inputs;
- the key list: addressed to it, its neighbours exactly as the published graph seed and members
  give them, enough of them to meet the threshold, a threshold its policy accepts for that many
  neighbours (``DevicePolicy``), no public key repeated;
- the bundle: boxes only from its neighbours, each authentic, at least ``threshold`` of them;
- the unmask request: no peer both survived and dropped, itself among the survivors, every peer it
  masked with classified, enough survivors, and only one request answered per session.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import numpy as np

from fedge_contract.errors import Reason
from fedge_contract.secagg import boxes, crypto, masks, shamir
from fedge_contract.secagg.crypto import KeyPair, Randomness
from fedge_contract.secagg.errors import ParameterError, ProtocolError
from fedge_contract.secagg.graph import Graph
from fedge_contract.secagg.messages import (
    KeyAdvert,
    KeyList,
    MaskedInput,
    PeerKeys,
    Reveal,
    RevealedShare,
    SealedShare,
    ServerMessage,
    Setup,
    ShareBundle,
    Shares,
    UnmaskRequest,
)


class DevicePhase(str, enum.Enum):
    ADVERTISED = "advertised"  # keys out, waiting for the key list
    SHARED = "shared"  # sealed shares out, waiting for the bundle addressed to it
    READY = "ready"  # holds its neighbours' shares, waiting for its own input
    MASKED = "masked"  # masked input out, waiting for the unmask request
    REVEALED = "revealed"  # answered the unmask request: done


@dataclass(frozen=True)
class DevicePolicy:
    """What a device insists on whatever the server announces (DESIGN.md, threat model)."""

    min_threshold_fraction: float = 0.4  # threshold >= this share of its neighbours: a server cannot lower how
    # many of them must collude with it to rebuild both of this device's secrets
    require_majority: bool = False  # threshold > half its neighbours: a server that tells some neighbours "u survived"
    # and others "u dropped" cannot collect both of u's secrets from honest ones. For the hardened deployment
    # (aggregator cannot write device topics); it needs a larger degree for the same dropout tolerance
    min_survivors: int = 2  # never help reveal a sum of fewer inputs than this


@dataclass(frozen=True)
class _Held:
    """The shares a neighbour sealed for this device."""

    seed_share: int
    key_share: int


def _refuse(reason: Reason, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail)


def _names(items: set[str] | frozenset[str], limit: int = 5) -> str:
    shown = sorted(items)[:limit]
    return ", ".join(shown) + (f" and {len(items) - limit} more" if len(items) > limit else "")


class DeviceSession:
    def __init__(
        self, setup: Setup, client_id: str, *, random: Randomness = os.urandom, policy: DevicePolicy = DevicePolicy(),
    ) -> None:
        if client_id not in setup.cohort:
            raise _refuse(Reason.NOT_IN_ROUND, f"{client_id} is not in the cohort of round {setup.round}")
        if setup.min_survivors < policy.min_survivors:
            raise _refuse(
                Reason.UNSAFE_REQUEST,
                f"min_survivors {setup.min_survivors} is below this device's floor of {policy.min_survivors}",
            )
        self.setup = setup
        self.client_id = client_id
        self.policy = policy
        self._random = random
        self._context = setup.context
        self._cipher = KeyPair.generate(random)
        self._mask = KeyPair.generate(random)
        self._seed = random(crypto.KEY_BYTES)
        self._advert = KeyAdvert(
            fleet=setup.fleet, round=setup.round, session=setup.session, sender=client_id,
            cipher_key=self._cipher.public, mask_key=self._mask.public,
        )
        self.phase = DevicePhase.ADVERTISED
        self._keys: tuple[KeyList, Shares] | None = None
        self._graph: Graph | None = None
        self._peers: dict[str, PeerKeys] = {}
        self._bundle: ShareBundle | None = None
        self._held: dict[str, _Held] = {}
        self._input: np.ndarray | None = None
        self._masked: MaskedInput | None = None
        self._reveal: tuple[UnmaskRequest, Reveal] | None = None

    def advertisement(self) -> KeyAdvert:
        """The first message: this device's two fresh public keys."""
        return self._advert

    def handle(self, message: ServerMessage) -> KeyAdvert | Shares | MaskedInput | Reveal | None:
        """The answer to one server message (None: nothing to send yet); ProtocolError if refused."""
        self._check_session(message)
        if isinstance(message, Setup):
            if message != self.setup:
                raise _refuse(Reason.CONFLICT, f"a different setup for session {message.session}")
            return self._advert
        if isinstance(message, KeyList):
            return self._on_keys(message)
        if isinstance(message, ShareBundle):
            return self._on_bundle(message)
        return self._on_unmask(message)

    def submit(self, vector: np.ndarray) -> MaskedInput | None:
        """This device's input (ring elements of the setup's length); the masked input once the shares are in."""
        ring = self.setup.ring
        if not ring.contains(vector) or len(vector) != self.setup.length:
            raise ParameterError(f"the input must be {self.setup.length} elements of the {ring.bits}-bit ring ({ring.dtype})")
        if self._input is not None:
            if not np.array_equal(self._input, vector):
                raise ParameterError("this session already has an input: a device cannot change it")
            return self._masked
        self._input = vector.copy()
        return self._mask_input(self._input) if self._bundle is not None else None

    # ---------------------------------------------------------------- phases

    def _check_session(self, message: ServerMessage) -> None:
        setup = self.setup
        if (message.fleet, message.round, message.session) != (setup.fleet, setup.round, setup.session):
            raise _refuse(
                Reason.WRONG_SESSION,
                f"{message.TYPE} for round {message.round} session {message.session}; this device is in round "
                f"{setup.round} session {setup.session}",
            )
        if message.sender != setup.sender:
            raise _refuse(Reason.WRONG_SESSION, f"{message.TYPE} from {message.sender}, not from {setup.sender}")
        recipient = getattr(message, "recipient", self.client_id)
        if recipient != self.client_id:
            raise _refuse(Reason.WRONG_RECIPIENT, f"{message.TYPE} addressed to {recipient}, not to {self.client_id}")

    def _on_keys(self, message: KeyList) -> Shares:
        if self._keys is not None:
            if message != self._keys[0]:
                raise _refuse(Reason.CONFLICT, "a second, different key list")
            return self._keys[1]
        graph, peers = self._check_keys(message)
        setup, me, context = self.setup, self.client_id, self._context
        points = {peer: graph.index(peer) for peer in peers}
        seed_shares = shamir.split(self._seed, points.values(), setup.threshold, self._random)
        key_shares = shamir.split(self._mask.private, points.values(), setup.threshold, self._random)
        sealed = tuple(
            SealedShare(
                peer,
                boxes.seal(context, self._cipher.private, peers[peer].cipher_key, me, peer,
                           seed_shares[x], key_shares[x], self._random),
            )
            for peer, x in sorted(points.items())
        )
        shares = Shares(
            fleet=setup.fleet, round=setup.round, session=setup.session, sender=me,
            seed_commitment=masks.seed_commitment(context, self._seed, me), boxes=sealed,
        )
        self._graph, self._peers, self._keys = graph, peers, (message, shares)
        self.phase = DevicePhase.SHARED
        return shares

    def _check_keys(self, message: KeyList) -> tuple[Graph, dict[str, PeerKeys]]:
        setup, me = self.setup, self.client_id
        strangers = set(message.members) - set(setup.cohort)
        if strangers:
            raise _refuse(Reason.NOT_IN_ROUND, f"key list members outside the cohort: {_names(strangers)}")
        if me not in message.members:
            raise _refuse(Reason.NOT_IN_ROUND, f"the key list's members do not include {me}")
        if len(message.members) < setup.min_survivors:
            raise _refuse(Reason.BELOW_THRESHOLD, f"{len(message.members)} members, fewer than min_survivors {setup.min_survivors}")
        try:
            graph = Graph(message.members, setup.degree, message.graph_seed)
        except ParameterError as exc:
            raise _refuse(Reason.BAD_VALUE, str(exc)) from None
        expected = graph.neighbours(me)
        got = {p.client_id for p in message.peers}
        if got != expected:
            raise _refuse(
                Reason.GRAPH_MISMATCH,
                f"the keys are not this device's neighbours in the graph: missing {_names(expected - got) or 'none'}, "
                f"extra {_names(got - expected) or 'none'}",
            )
        if len(expected) < setup.threshold:
            raise _refuse(Reason.BELOW_THRESHOLD, f"{len(expected)} neighbours cannot meet the threshold {setup.threshold}")
        if self.policy.require_majority and 2 * setup.threshold <= len(expected):
            raise _refuse(
                Reason.UNSAFE_REQUEST, f"threshold {setup.threshold} is not a majority of {len(expected)} neighbours",
            )
        if setup.threshold < self.policy.min_threshold_fraction * len(expected):
            raise _refuse(
                Reason.UNSAFE_REQUEST,
                f"threshold {setup.threshold} is below {self.policy.min_threshold_fraction:.0%} of {len(expected)} neighbours",
            )
        keys = [self._cipher.public, self._mask.public] + [k for p in message.peers for k in (p.cipher_key, p.mask_key)]
        if len(set(keys)) != len(keys):
            raise _refuse(Reason.CONFLICT, "the key list repeats a public key")
        for peer in message.peers:  # refuse unusable keys now, before any share leaves
            crypto.agree(self._cipher.private, peer.cipher_key, peer=peer.client_id)
            crypto.agree(self._mask.private, peer.mask_key, peer=peer.client_id)
        return graph, {p.client_id: p for p in message.peers}

    def _on_bundle(self, message: ShareBundle) -> MaskedInput | None:
        if self._keys is None or self._graph is None:
            raise _refuse(Reason.WRONG_PHASE, "a share bundle before the key list")
        if self._bundle is not None:
            if message != self._bundle:
                raise _refuse(Reason.CONFLICT, "a second, different share bundle")
            return self._masked
        neighbours = self._graph.neighbours(self.client_id)
        senders = {b.peer for b in message.boxes}
        if not senders <= neighbours:
            raise _refuse(Reason.GRAPH_MISMATCH, f"boxes from devices that are not neighbours: {_names(senders - neighbours)}")
        if len(senders) < self.setup.threshold:
            raise _refuse(Reason.BELOW_THRESHOLD, f"boxes from {len(senders)} neighbours, fewer than the threshold {self.setup.threshold}")
        held = {}
        for sealed in message.boxes:
            seed_share, key_share = boxes.open_box(
                self._context, self._cipher.private, self._peers[sealed.peer].cipher_key, sealed.peer, self.client_id, sealed.box,
            )
            held[sealed.peer] = _Held(seed_share, key_share)
        self._bundle, self._held = message, held
        self.phase = DevicePhase.READY
        return self._mask_input(self._input) if self._input is not None else None

    def _mask_input(self, vector: np.ndarray) -> MaskedInput:
        setup, me, context = self.setup, self.client_id, self._context
        ring, length = setup.ring, setup.length
        total = vector.copy()
        total += masks.self_mask(context, self._seed, me, ring, length)
        for peer in sorted(self._held):
            shared = crypto.agree(self._mask.private, self._peers[peer].mask_key, peer=peer)
            mask = masks.pair_mask(context, shared, me, peer, ring, length)
            if masks.adds_pair_mask(me, peer):
                total += mask
            else:
                total -= mask
        self._masked = MaskedInput(
            fleet=setup.fleet, round=setup.round, session=setup.session, sender=me,
            bits=ring.bits, length=length, data=ring.to_bytes(ring.reduce(total)),
        )
        self.phase = DevicePhase.MASKED
        return self._masked

    def _on_unmask(self, message: UnmaskRequest) -> Reveal:
        if self._reveal is not None:
            if message != self._reveal[0]:
                raise _refuse(Reason.CONFLICT, "a second, different unmask request: a device answers one per session")
            return self._reveal[1]
        if self._masked is None or self._keys is None:
            raise _refuse(Reason.WRONG_PHASE, "an unmask request before this device sent its masked input")
        self._check_unmask(message, self._keys[0].members)
        survivors = set(message.survivors)
        seeds = tuple(RevealedShare(p, shamir.share_to_bytes(h.seed_share)) for p, h in sorted(self._held.items()) if p in survivors)
        keys = tuple(RevealedShare(p, shamir.share_to_bytes(h.key_share)) for p, h in sorted(self._held.items()) if p not in survivors)
        setup = self.setup
        reveal = Reveal(fleet=setup.fleet, round=setup.round, session=setup.session, sender=self.client_id, seeds=seeds, keys=keys)
        self._reveal = (message, reveal)
        self.phase = DevicePhase.REVEALED
        return reveal

    def _check_unmask(self, message: UnmaskRequest, members: tuple[str, ...]) -> None:
        survivors, dropped = set(message.survivors), set(message.dropped)
        both = survivors & dropped
        if both:
            raise _refuse(Reason.UNSAFE_REQUEST, f"asks to reveal both the mask seed and the mask key of {_names(both)}")
        if self.client_id not in survivors:
            raise _refuse(Reason.UNSAFE_REQUEST, f"{self.client_id} sent its masked input but is not listed among the survivors")
        if len(survivors) < self.setup.min_survivors:
            raise _refuse(
                Reason.BELOW_THRESHOLD, f"a sum of {len(survivors)} inputs, fewer than min_survivors {self.setup.min_survivors}",
            )
        strangers = (survivors | dropped) - set(members)
        if strangers:
            raise _refuse(Reason.NOT_IN_ROUND, f"lists devices that are not members of the session: {_names(strangers)}")
        unclassified = set(self._held) - survivors - dropped
        if unclassified:
            raise _refuse(Reason.UNSAFE_REQUEST, f"does not say whether {_names(unclassified)} survived or dropped")

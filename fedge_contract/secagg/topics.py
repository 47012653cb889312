"""The MQTT topics of the protocol (DESIGN.md, topics and ACL).

Everything lives under ``fl/<fleet>/secagg/``. What devices publish is under ``up/<kind>/<client_id>``
(one topic per message type, so the topic names its decoder, and the broker ACL lets a device
write only where the last level is its own username); what the aggregator publishes is under
``down/``: the two broadcasts ``down/setup`` and ``down/unmask`` (retained) and the per-device
``down/keys/<client_id>`` and ``down/bundle/<client_id>`` that only that device may read.

A masked input larger than the device's ``max_message_bytes`` travels like a large update
(fedge_contract/chunks.py): its chunks retained on ``up/masked/<client_id>/<session>/<i>``, then an
update-kind manifest (``update_id`` = the session) on ``up/masked/<client_id>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedge_contract.secagg.messages import DeviceMessage, KeyAdvert, MaskedInput, Reveal, Shares
from fedge_contract.topics import check_name

_INDEX = re.compile(r"^(0|[1-9][0-9]{0,9})$")  # canonical decimal, as for update chunks
DEVICE_KINDS: dict[str, type[DeviceMessage]] = {"advert": KeyAdvert, "shares": Shares, "masked": MaskedInput, "reveal": Reveal}


@dataclass(frozen=True)
class DeviceTopic:
    """A device topic split: which message type it carries and whose it is."""

    kind: type[DeviceMessage]
    client_id: str


@dataclass(frozen=True)
class MaskedChunk:
    """A chunk topic of a chunked masked input: whose, for which session, which chunk."""

    client_id: str
    session: str
    index: int


@dataclass(frozen=True)
class SecAggTopics:
    fleet: str = "default"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)

    @property
    def prefix(self) -> str:
        return f"fl/{self.fleet}/secagg"

    @property
    def setup(self) -> str:
        return f"{self.prefix}/down/setup"

    @property
    def unmask(self) -> str:
        return f"{self.prefix}/down/unmask"

    def keys(self, client_id: str) -> str:
        return f"{self.prefix}/down/keys/{check_name('client id', client_id)}"

    def bundle(self, client_id: str) -> str:
        return f"{self.prefix}/down/bundle/{check_name('client id', client_id)}"

    def device(self, kind: type[DeviceMessage], client_id: str) -> str:
        name = next(k for k, v in DEVICE_KINDS.items() if v is kind)
        return f"{self.prefix}/up/{name}/{check_name('client id', client_id)}"

    def masked_chunks(self, client_id: str, session: str) -> str:
        """Base topic of the chunks of ``client_id``'s masked input in ``session``: ``up/masked/<id>/<session>``."""
        return f"{self.device(MaskedInput, client_id)}/{check_name('session', session)}"

    def for_device(self, client_id: str) -> list[str]:
        """What a device subscribes to: the two broadcasts and its own key list and bundle (all it may read)."""
        return [self.setup, self.unmask, self.keys(client_id), self.bundle(client_id)]

    @property
    def all_from_devices(self) -> str:
        """What the aggregator subscribes to (chunks of large masked inputs travel below ``up/masked/<id>/``)."""
        return f"{self.prefix}/up/+/+"

    def parse_device(self, topic: str) -> DeviceTopic | None:
        """The message type and client id of an ``up/<kind>/<client_id>`` topic of this fleet, else None."""
        parts = topic.split("/")
        if len(parts) != 6 or parts[:4] != ["fl", self.fleet, "secagg", "up"] or parts[4] not in DEVICE_KINDS:
            return None
        try:
            return DeviceTopic(DEVICE_KINDS[parts[4]], check_name("client id", parts[5]))
        except ValueError:
            return None

    def parse_masked_chunk(self, topic: str) -> MaskedChunk | None:
        """The client, session and index of an ``up/masked/<client_id>/<session>/<i>`` topic of this fleet, else None."""
        parts = topic.split("/")
        if len(parts) != 8 or parts[:5] != ["fl", self.fleet, "secagg", "up", "masked"] or not _INDEX.match(parts[7]):
            return None
        try:
            return MaskedChunk(check_name("client id", parts[5]), check_name("session", parts[6]), int(parts[7]))
        except ValueError:
            return None

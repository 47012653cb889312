"""The MQTT topics proposed for the protocol (DESIGN.md, topics and ACL); not wired yet.

Everything lives under ``fl/<fleet>/secagg/``. What devices publish is under ``up/<kind>/<client_id>``
(one topic per message type, so the topic names its decoder, and the broker ACL lets a device
write only where the last level is its own username); what the aggregator publishes is under
``down/``: the two broadcasts ``down/setup`` and ``down/unmask`` (retained) and the per-device
``down/keys/<client_id>`` and ``down/bundle/<client_id>`` that only that device may read.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedge_contract.secagg.messages import DeviceMessage, KeyAdvert, MaskedInput, Reveal, Shares
from fedge_contract.topics import check_name

DEVICE_KINDS: dict[str, type[DeviceMessage]] = {"advert": KeyAdvert, "shares": Shares, "masked": MaskedInput, "reveal": Reveal}


@dataclass(frozen=True)
class DeviceTopic:
    """A device topic split: which message type it carries and whose it is."""

    kind: type[DeviceMessage]
    client_id: str


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

"""MQTT topic names of one fleet (DESIGN.md, Topics)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_NUMBER = re.compile(r"^(0|[1-9][0-9]{0,9})$")  # canonical decimal: '05' would name chunk 5 twice


@dataclass(frozen=True)
class ChunkTopic:
    """A chunk's topic split into its set (``base``, the topic of every chunk of one message
    minus the last level) and its ``index``."""

    base: str
    index: int


def check_name(kind: str, value: str) -> str:
    """Refuse names that would escape their topic level (``/``, ``+``, ``#``) or be unreadable."""
    if not _NAME.match(value):
        raise ValueError(
            f"{kind} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """The topics of fleet ``fleet``: ``fl/<fleet>/...``."""

    fleet: str = "default"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)

    @property
    def prefix(self) -> str:
        return f"fl/{self.fleet}"

    @property
    def global_model(self) -> str:
        return f"{self.prefix}/global"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/updates/+"

    def shared_updates(self, group: str) -> str:
        """``all_updates`` as an MQTT 5 shared subscription: the broker hands each update to one member of ``group``."""
        return f"$share/{check_name('share group', group)}/{self.all_updates}"

    @property
    def all_presence(self) -> str:
        return f"{self.prefix}/presence/+"

    def update(self, client_id: str) -> str:
        return f"{self.prefix}/updates/{check_name('client id', client_id)}"

    def receipt(self, client_id: str) -> str:
        return f"{self.prefix}/receipts/{check_name('client id', client_id)}"

    def presence(self, client_id: str) -> str:
        return f"{self.prefix}/presence/{check_name('client id', client_id)}"

    def evals(self, client_id: str) -> str:
        """A device's reports of federated evaluation (fedge_contract/evaluation.py): ``fl/<fleet>/evals/<client_id>``."""
        return f"{self.prefix}/evals/{check_name('client id', client_id)}"

    @property
    def all_evals(self) -> str:
        return f"{self.prefix}/evals/+"

    # Large messages travel in chunks (fedge_contract/chunks.py), retained on sub-topics of the
    # message's own topic: the version or update id in the topic keeps chunk sets apart.
    def global_chunks(self, version: int) -> str:
        """Base topic of the chunks of global model ``version``: ``fl/<fleet>/global/<version>``."""
        if version < 0:
            raise ValueError(f"model version must be >= 0, got {version}")
        return f"{self.global_model}/{version}"

    # Delta broadcasts (fedge_contract.broadcast): what a device that missed versions catches up
    # from, beside the announcement on ``global``. The third level is a word, never a number, so
    # these never look like the chunk topics ``global/<version>/<i>``.
    @property
    def global_keyframe(self) -> str:
        """The retained keyframe (a full model) that catch-up starts from: ``fl/<fleet>/global/key``."""
        return f"{self.global_model}/key"

    @property
    def global_task(self) -> str:
        """The retained task (a GlobalTask) that delta announcements name by its id: ``fl/<fleet>/global/task``."""
        return f"{self.global_model}/task"

    def global_delta(self, version: int) -> str:
        """The retained delta that makes ``version`` from ``version - 1``: ``fl/<fleet>/global/delta/<version>``.

        It is also the base of that delta's chunks, when it is chunked."""
        if version < 1:
            raise ValueError(f"a delta makes a version >= 1, got {version}")
        return f"{self.global_model}/delta/{version}"

    def keyframe_chunks(self, version: int) -> str:
        """Base topic of the chunks of keyframe ``version``: ``fl/<fleet>/global/key/<version>``."""
        if version < 0:
            raise ValueError(f"model version must be >= 0, got {version}")
        return f"{self.global_keyframe}/{version}"

    def update_chunks(self, client_id: str, update_id: str) -> str:
        """Base topic of the chunks of one update: ``fl/<fleet>/updates/<client>/<update_id>``."""
        return f"{self.update(client_id)}/{check_name('update id', update_id)}"

    def chunk_of(self, topic: str) -> ChunkTopic | None:
        """The chunk set and index of a ``global/<version>/<i>``, ``global/key/<version>/<i>``,
        ``global/delta/<version>/<i>`` or ``updates/<client>/<update_id>/<i>`` topic of this fleet, else None."""
        parts = topic.split("/")
        if len(parts) < 5 or parts[0] != "fl" or parts[1] != self.fleet or not _NUMBER.match(parts[-1]):
            return None
        if len(parts) == 5 and parts[2] == "global" and _NUMBER.match(parts[3]):
            return ChunkTopic(topic.rsplit("/", 1)[0], int(parts[4]))
        if len(parts) == 6 and parts[2] == "global" and parts[3] in ("key", "delta") and _NUMBER.match(parts[4]):
            return ChunkTopic(topic.rsplit("/", 1)[0], int(parts[5]))
        if len(parts) == 6 and parts[2] == "updates" and _NAME.match(parts[3]) and _NAME.match(parts[4]):
            return ChunkTopic(topic.rsplit("/", 1)[0], int(parts[5]))
        return None

    def client_of(self, topic: str) -> str | None:
        """The client id in an ``updates/<id>``, ``presence/<id>``, ``receipts/<id>`` or ``evals/<id>`` topic of this fleet, else None."""
        parts = topic.split("/")
        fleet_topic = len(parts) == 4 and parts[0] == "fl" and parts[1] == self.fleet
        if fleet_topic and parts[2] in ("updates", "presence", "receipts", "evals") and _NAME.match(parts[3]):
            return parts[3]
        return None

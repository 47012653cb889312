"""Delta broadcasts: each new model version reaches devices as a compressed delta (issue 16).

Both sides speak it; it imports no torch and touches no MQTT.

    held.py       the held model's hash and the one rebuild step (decode, float32 add)
    wire.py       GlobalDelta, the announcement of a version as a delta; decode_announcement
    policy.py     BroadcastPolicy: the delta chain, keyframes (snapshot or reset), the catch-up bound
    records.py    Broadcast, Keyframe, Step: what the encoder hands the broadcaster, and their plain form
    encoder.py    BroadcastEncoder: the aggregator's side, server-side error feedback, its state
    rebuilder.py  Rebuilder: a device's side, accept / plan / catch_up, its state
    task.py       task_id, GlobalTask: the TaskConfig sent once, named by an 8-byte id in each delta

Topics (all retained, all under ``fl/<fleet>/global``, which devices may read: ``global/#``):

    global                      the announcement of the current version: a GlobalDelta, or a
                                GlobalModel when the version is a reset or the first of a run
    global/key                  the keyframe: a GlobalModel (with held_hash) of version k
    global/delta/<u>            the GlobalDelta of each version k < u <= v, for catch-up
    global/task                 the current task (a GlobalTask), named by task_id in the deltas
    global/<v>/<i>              chunks of a large announcement (as before)
    global/key/<k>/<i>          chunks of a large keyframe (manifest kind "keyframe")
    global/delta/<u>/<i>        chunks of a large retained delta (manifest kind "delta")

A new keyframe replaces ``global/key``; the broadcaster then clears ``global/delta/<u>`` for the
versions it covers (``Step.retire``: an empty retained message deletes one) and the old keyframe's
chunks. What a device does is in rebuilder.py; the most it downloads to catch up is
``policy.worst_case_catch_up_bytes``.
"""

from fedge_contract.broadcast.encoder import BroadcastEncoder
from fedge_contract.broadcast.held import HELD_HASH_BYTES, apply_delta, decode_full, held_digest
from fedge_contract.broadcast.policy import DEFAULT_BROADCAST_CHAIN, BroadcastPolicy, worst_case_catch_up_bytes
from fedge_contract.broadcast.rebuilder import CatchUp, Held, Rebuilder
from fedge_contract.broadcast.records import Announcement, Broadcast, Keyframe, Step
from fedge_contract.broadcast.task import TASK_ID_BYTES, GlobalTask, task_id
from fedge_contract.broadcast.wire import GlobalDelta, decode_announcement

__all__ = [
    "DEFAULT_BROADCAST_CHAIN",
    "HELD_HASH_BYTES",
    "TASK_ID_BYTES",
    "Announcement",
    "Broadcast",
    "BroadcastEncoder",
    "BroadcastPolicy",
    "CatchUp",
    "GlobalDelta",
    "GlobalTask",
    "Held",
    "Keyframe",
    "Rebuilder",
    "Step",
    "apply_delta",
    "decode_announcement",
    "decode_full",
    "held_digest",
    "task_id",
    "worst_case_catch_up_bytes",
]

"""How each new model version reaches the fleet: the channel the Announcer publishes through.

    channel.py      the protocol (ModelChannel), the round's side of an announcement, model_channel(config)
    full.py         FullModels: the whole model every version, in global_codec (--no-delta-broadcasts)
    deltas.py       DeltaBroadcasts: each version as a delta from the model devices hold (issue 16, the default)
    broadcaster.py  Broadcaster: the retained publishes of delta broadcasts, and their state
    failures.py     CatchUpFailures: when devices' presence asks for a keyframe
"""

from aggregator.broadcasting.channel import Announced, ModelChannel, Prepared, model_channel

__all__ = ["Announced", "ModelChannel", "Prepared", "model_channel"]

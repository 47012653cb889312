"""How fedge programs reach the broker: one import for broker URLs, MQTT conventions and connections.

- ``mqtt_client``: ``BrokerAddress`` (broker URLs, TLS files), fedge's client conventions (MQTT 5,
  QoS 1, persistent sessions), ``make_client`` for a plain one-shot ``Client``;
- ``connection``: the self-healing, supervised ``Connection`` every long-lived program owns, and
  ``Subscriber`` for passive watchers;
- ``reconnect``: the Connection's reconnect ``Backoff`` and ``MAX_RETURN_DELAY``, the longest a
  device takes to come back after the broker returns;
- ``errors``: ``ConnectionLost`` (an operation the network cut off) and ``ConnectionFailed`` (a
  connection stopped for good). aiomqtt's own errors never leave fedge_contract.
"""

from fedge_contract.connection import Connection, Subscriber
from fedge_contract.errors import ConnectionFailed, ConnectionLost
from fedge_contract.mqtt_client import QOS, BrokerAddress, Client, make_client
from fedge_contract.reconnect import MAX_RETURN_DELAY, Backoff

__all__ = [
    "MAX_RETURN_DELAY",
    "QOS",
    "Backoff",
    "BrokerAddress",
    "Client",
    "Connection",
    "ConnectionFailed",
    "ConnectionLost",
    "Subscriber",
    "make_client",
]

"""Mosquitto configurations for fedge and the helper that runs a local broker.

fedge never implements a broker: it runs Mosquitto (2.0+) with the configs in ``mosquitto/``.
"""

from broker.local import BrokerNotFound, LocalBroker, find_mosquitto

__all__ = ["BrokerNotFound", "LocalBroker", "find_mosquitto"]

"""Errors of the broker package: one root, importable without the provisioning's crypto libraries.

    BrokerError            root
     +-- BrokerNotFound    Mosquitto is not installed where we can find it
     +-- BrokerStartError  Mosquitto exited or did not come up; the message carries its log
     +-- ProvisionError    a broker folder or the tools are not what provisioning needs

They stay RuntimeErrors, as before the root existed, so callers that caught those keep working.
"""

from __future__ import annotations


class BrokerError(RuntimeError):
    """Root of the broker package's errors; the message says what to do."""


class BrokerNotFound(BrokerError):
    """Mosquitto is not installed where we can find it."""


class BrokerStartError(BrokerError):
    """Mosquitto exited or did not come up; the message carries its log."""


class ProvisionError(BrokerError):
    """The folder or the tools are not what provisioning needs; the message says what to do."""

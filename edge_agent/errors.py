"""The agent's errors that cross the torch boundary (raised by training, caught by the torch-free loop)."""

from __future__ import annotations


class FingerprintMismatch(Exception):
    """The global model has another architecture than this device's task builds."""


class TrainingFailed(RuntimeError):
    """The training process could not train (task import, data over its memory limit, crash); says why."""

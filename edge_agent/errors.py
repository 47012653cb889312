"""The agent's errors: one root, ``AgentError``, so a caller can tell the agent's problems from bugs.

::

    AgentError
    ├── FingerprintMismatch   the global model has another architecture than this device's task builds
    ├── TrainingFailed        (also RuntimeError) the training process could not train: task import,
    │                         data over its memory limit, a crash; says why
    └── PolicyError           (also ValueError) a [policy] setting is invalid (edge_agent/policy.py)

Invalid settings (a missing broker, ``train_nice = 40``, an unreadable config file) raise
``fedge_runtime.settings.SettingsError`` instead, not a subclass of ours: the same loader reads the
aggregator's settings, and the CLI catches that one class for both programs. The policy's own
checks raise ``PolicyError``; when the loader builds the policy it reports them as a
``SettingsError`` naming where the value came from. ``FingerprintMismatch`` and ``TrainingFailed``
cross the torch boundary: the training child raises them, the torch-free loop catches them.
"""

from __future__ import annotations


class AgentError(Exception):
    """Something the agent cannot do; the message says what and what to do."""


class FingerprintMismatch(AgentError):
    """The global model has another architecture than this device's task builds."""


class TrainingFailed(AgentError, RuntimeError):
    """The training process could not train (task import, data over its memory limit, crash); says why."""

"""The ``fedge`` command's own errors (the CLI package's root).

::

    CommandError            a command cannot do what it was asked (the message says what to change)
    └── ReportError         (fedge/report.py) the folder holds no readable aggregator store

Bad settings raise ``fedge_runtime.settings.SettingsError``; the programs raise their own roots
(``AgentError``, ``AggregatorError``, ``ContractError``, ``TaskLoadError``). ``fedge.cli.main``
prints each of them, and ``OSError``, as one line (exit code 2); a store that cannot be used is
one line too, with exit code 74 (``fedge.failures``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CommandError(Exception):
    """A command cannot do what it was asked; the message says what to change."""

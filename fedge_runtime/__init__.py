"""Process-level helpers shared by fedge's programs (the agent, the aggregator, the CLI).

It imports none of them: logging set-up (``logs``), the aggregator's allocator tuning
(``allocator``) and the one configuration loader (``settings``) sit below every program, so a
device that installs only the agent does not pull in the aggregator to read its settings.
"""

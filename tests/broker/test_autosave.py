"""What fedge's Mosquitto configs really do about persistence, read from a real Mosquitto's log (issue 19).

The README said the broker saves every second; the chaos run's broker log showed a save every 2 s.
Mosquitto 2.0 saves when ``last_save + autosave_interval < now`` in whole seconds: an interval of N
saves every N + 1 s, changes or not. ``autosave_interval 1`` (what dev.conf and production.conf set)
is the shortest time-based period, 2 s; 0 turns autosave off. ``autosave_on_changes true`` would
save every N changes instead, the whole database each time (README: flaky networks).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from importlib import resources

import pytest

pytestmark = pytest.mark.integration

SAVED = re.compile(r"^(\d+): Saving in-memory database to ")


def save_times(lines: list[str]) -> list[int]:
    return [int(match.group(1)) for line in lines if (match := SAVED.match(line))]


@pytest.mark.parametrize("config", ["dev.conf", "production.conf"])
def test_both_configs_ask_for_the_shortest_time_based_autosave(config):
    text = resources.files("broker").joinpath(f"mosquitto/{config}").read_text()
    settings = dict(line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#") and " " in line)
    assert settings["persistence"] == "true" and settings["autosave_interval"] == "1"
    assert "autosave_on_changes" not in settings


async def test_the_dev_broker_saves_every_two_seconds_whether_or_not_anything_changed(broker):
    async with asyncio.timeout(20):
        await broker.wait_for_log(lambda lines: len(save_times(lines)) >= 4)
    times = save_times(broker.log_lines)
    assert {later - earlier for earlier, later in itertools.pairwise(times)} == {2}, broker.log_lines

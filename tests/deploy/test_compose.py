"""deploy/compose: valid YAML with Mosquitto and the aggregator, each with its volume (docker cannot run here)."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose"


def load() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_services_and_volumes():
    doc = load()
    assert set(doc["services"]) == {"mosquitto", "aggregator"}
    assert set(doc["volumes"]) == {"mosquitto-data", "aggregator-store"}
    mosquitto, aggregator = doc["services"]["mosquitto"], doc["services"]["aggregator"]
    assert "mosquitto-data:/mosquitto/data" in mosquitto["volumes"]
    assert "aggregator-store:/var/lib/fedge" in aggregator["volumes"]
    assert mosquitto["restart"] == aggregator["restart"] == "unless-stopped"
    assert aggregator["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert "mqtt://mosquitto:1883" in aggregator["command"]


def test_referenced_files_exist():
    doc = load()
    build = doc["services"]["aggregator"]["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).is_file()
    conf_mount = next(v for v in doc["services"]["mosquitto"]["volumes"] if "mosquitto.conf" in v)
    assert (COMPOSE / conf_mount.split(":")[0]).is_file()


def test_mosquitto_conf_persists_and_does_not_drop_queued_messages():
    lines = {line.split()[0]: line.split()[1:] for line in (COMPOSE / "mosquitto.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert lines["persistence"] == ["true"] and lines["persistence_location"] == ["/mosquitto/data/"]
    assert lines["max_queued_messages"] == ["0"]  # the default 1000 silently drops QoS 1 (DESIGN.md)


def test_dockerfile_store_matches_the_volume():
    text = (COMPOSE / "Dockerfile").read_text()
    assert '"--store", "/var/lib/fedge/store.sqlite"' in text
    assert "download.pytorch.org/whl/cpu" in text  # torch from the CPU index, before fedge
    assert text.index("torch==") < text.index('pip install ".[sim]"')

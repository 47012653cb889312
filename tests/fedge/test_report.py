"""``fedge report``: a real simulation's store rendered to PNGs and HTML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aggregator.store import Store
from tests.integration.fleet import run_fedge

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "run"
    result = run_fedge("simulate", "--agents", "3", "--rounds", "2", "--out", str(out), "--quiet", timeout=110)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.integration
def test_report_of_a_simulation(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run_fedge("report", str(run_dir), "--out", str(out), timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(out / "report.html") in result.stdout
    for name in ("accuracy", "loss", "participants", "receipts", "bytes"):
        assert (out / f"report-{name}.png").read_bytes().startswith(PNG_MAGIC)
    page = (out / "report.html").read_text()
    with Store(run_dir / "aggregator.sqlite") as store:
        rounds = store.rounds()
        accepted = sum(1 for r in store.receipts() if r["status"] == "accepted")
    assert [r["round"] for r in rounds] == [1, 2]
    rows = re.findall(r"<tr><td>(\d+)</td>", page)
    assert rows == ["1", "2"]
    for r in rounds:
        assert f"<td>{r['metrics']['accuracy']:.4f}</td>" in page
    assert page.count("data:image/png;base64,") == 5  # self-contained: the plots are embedded
    assert f"final accuracy {rounds[-1]['metrics']['accuracy']:.4f}" in page
    assert accepted == sum(r["accepted"] for r in rounds)
    # bytes down next to bytes up: round 1 announced version 0 (a hold), round 2 a delta, each far below the model's 38,889
    assert 200 < rounds[0]["bytes_down"] < 500 and 300 < rounds[1]["bytes_down"] < 2_000
    for r in rounds:
        assert f"<td>{r['bytes_down']:,}</td></tr>" in page


def test_report_without_a_store_is_a_clear_error(tmp_path: Path) -> None:
    result = run_fedge("report", str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "expected aggregator.sqlite" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "aggregator.sqlite").write_bytes(b"not a database at all, just some bytes" * 100)
    result = run_fedge("report", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "not a readable aggregator store" in result.stderr, result.stderr

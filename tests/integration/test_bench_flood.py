"""``python -m bench flood --quick`` runs: alerts through a 20,000-message campaign.

The full run (1,000,000 messages, ``python -m bench flood``) is opt-in; this checks
that the quick one completes with ``outbox dispatch --processes 2``, drains the whole
campaign, delivers every alert, and measures their latency (the figures themselves
mean little at this size and on a shared machine: no target is asserted).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_the_flood_benchmark_runs_in_quick_mode_and_its_figures_are_sane(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    figures = tmp_path / "flood.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "flood",
            "--quick",
            "--json",
            str(figures),
            "--database-url",
            pg_server.url("postgres"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for heading in ("Alert latency under a flood", "Targets", "machine: python="):
        assert heading in output, output[-3000:]
    assert "alert p99 under the flood" in output

    (measured,) = json.loads(figures.read_text())["rounds"]
    assert measured["campaign_delivered"] == measured["messages"] == 20_000
    assert measured["rate"] > 0 and measured["drain_seconds"] > 0
    assert measured["alerts_committed"] >= 3
    assert measured["alerts_delivered"] == measured["alerts_committed"], "an alert was lost"
    latencies = measured["latencies_ms"]
    assert latencies, "no alert was committed while the campaign drained"
    assert all(0 < ms < 10_000 for ms in latencies) and not any(map(math.isnan, latencies))
    assert measured["supervisor_exit"] == 0

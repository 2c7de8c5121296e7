"""``python -m bench streams --quick`` runs: 20 open streams on a real ``outbox api``.

The full load check (1,000 streams, ``python -m bench streams``) is opt-in; this only
checks that the benchmark completes, loses no item and prints its tables and
targets. Its own smoke test, apart from test_bench_smoke.py: it starts an API
process rather than dispatchers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_the_streams_benchmark_runs_in_quick_mode(pg_server) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "streams",
            "--quick",
            "--check",
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
    for heading in ("Inbox stream latency, commit to event", "API memory", "Targets"):
        assert heading in output, output[-3000:]
    assert "round 1: 20 items" in output and "lost 0" in output
    assert "MISSED" not in output

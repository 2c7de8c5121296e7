"""Every benchmark still runs: ``python -m bench NAME --quick`` against the test server.

The seven run side by side (each is mostly waiting on subprocesses and the database),
so the whole smoke test takes about as long as the slowest one. Their figures mean
nothing at these counts; what is checked is that each one completes, prints its
tables and its targets, and exits 0.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = {
    "drain": "Drain rate",
    "producer": "Producer transactions",
    "latency": "Commit to send start",
    "backlog": "Claim cost",
    "channels": "Limits held across",
    "memory": "Dispatcher memory",
    "claims": "Claim cost, outbox_0009 against head",
}


@pytest.mark.timeout(150)
def test_every_benchmark_runs_in_quick_mode(pg_server) -> None:  # type: ignore[no-untyped-def]
    url = pg_server.url("postgres")
    started = time.monotonic()
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bench", name, "--quick", "--database-url", url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in BENCHMARKS
    }
    failures = []
    for name, process in running.items():
        try:
            output, _ = process.communicate(timeout=max(1.0, 140 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            failures.append(f"{name}: timed out\n{output[-2000:]}")
            continue
        if process.returncode != 0:
            failures.append(f"{name}: exit {process.returncode}\n{output[-2000:]}")
        elif BENCHMARKS[name] not in output or "Targets" not in output:
            failures.append(f"{name}: tables missing\n{output[-2000:]}")
    assert not failures, "\n\n".join(failures)

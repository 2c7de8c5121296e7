"""The chaos run, short: a few thousand messages while everything gets killed.

The same run as ``python -m bench chaos`` (see ``bench/chaos.py``), sized to finish
in about half a minute: 8 producers with 30% rollbacks and a ledger, 3 dispatcher
subprocesses, SIGKILLs every 2-4 s, ``pg_terminate_backend`` rounds, and one crash
and restart of the run's own PostgreSQL. The long run (50,000 messages) is
``python -m bench chaos``.
"""

from __future__ import annotations

import pytest

from bench.chaos import ChaosConfig, run_chaos


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_crashes_restarts_and_killed_connections_lose_nothing_and_send_nothing_rolled_back() -> (
    None
):
    report = run_chaos(
        ChaosConfig(
            messages=3000,
            seconds=15,
            kill_every=(2.0, 4.0),
            terminate_every=(2.0, 5.0),
            # producers outrun the dispatchers, so every kill hits a full queue
            concurrency=4,
            send_delay=0.05,
            drain_timeout=90,
            verbose=False,
        )
    )
    print("\n" + report.table())
    assert report.sigkills >= 3 and report.postgres_restarts == 1, report.table()
    assert report.committed >= 3000
    assert report.ok, report.table() + f"\nlogs: {report.workdir}"

"""The chaos run, short: a few thousand messages while everything gets killed.

The same run as ``python -m bench chaos`` (see ``bench/chaos.py``), sized to finish
in well under a minute: 8 producers with 30% rollbacks and a ledger, 3 dispatcher
subprocesses, SIGKILLs every 2-4 s, ``pg_terminate_backend`` rounds, and one crash
and restart of the run's own PostgreSQL. A fifth of the messages are alerts with a
chain of two or three channels (escalate_after 1.5-3 s); the producer side cancels
some messages and acknowledges half of the alerts at random moments while all of
that goes on, and leaves the other alerts to escalate to their chain's end. The
long run (50,000 messages) is ``python -m bench chaos``.
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
            # producers outrun the dispatchers, so every kill hits a full queue (and
            # cancels find messages still pending)
            concurrency=4,
            send_delay=0.05,
            escalate_after=(1.5, 3.0),
            drain_timeout=90,
            verbose=False,
        )
    )
    print("\n" + report.table())
    assert report.sigkills >= 3 and report.postgres_restarts == 1, report.table()
    assert report.committed >= 3000
    # the second wave was exercised, not just present
    assert report.alerts >= 300 and report.escalations >= 100, report.table()
    assert report.cancel_answers.get("true", 0) >= 10, report.table()
    assert report.acknowledged >= 50 and report.waiting_at_chain_end >= 50, report.table()
    assert report.ok, report.table() + f"\nlogs: {report.workdir}"

"""The supervisor's decisions that need no process: its command line and its back-off."""

from __future__ import annotations

import pytest

from outbox._settings import Settings
from outbox.cli import main
from outbox.dispatcher._supervisor import (
    MAX_RESTART_DELAY_SECONDS,
    STABLE_AFTER_SECONDS,
    Supervisor,
    SupervisorOptions,
    _Child,
    child_arguments,
    parse_processes,
    usable_cpus,
)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "at least 1 process (or 'auto'), not 0"),
        ("-1", "at least 1 process (or 'auto'), not -1"),
        ("abc", "expected a number of processes or 'auto', not 'abc'"),
        ("1.5", "expected a number of processes or 'auto', not '1.5'"),
    ],
)
def test_a_bad_process_count_is_a_usage_error_that_says_what_is_expected(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["dispatch", "--processes", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --processes: {message}" in err, err


def test_auto_is_one_process_per_usable_cpu() -> None:
    assert parse_processes("auto") == usable_cpus() >= 1
    assert parse_processes("AUTO", cpu_count=lambda: 7) == 7
    assert parse_processes("3") == 3


def test_the_children_run_the_same_dispatcher_the_user_asked_for() -> None:
    args = child_arguments(
        verbose=True,
        concurrency=8,
        batch_size=50,
        shutdown_grace="3s",
        until_idle=True,
        idle_horizon="5s",
        urgent_reserve=10,
    )
    assert args == (
        "-v",
        "dispatch",
        "--concurrency",
        "8",
        "--batch-size",
        "50",
        "--urgent-reserve",
        "10",
        "--shutdown-grace",
        "3s",
        "--idle-horizon",
        "5s",
        "--until-idle",
    )
    assert "--metrics-port" not in args and "--processes" not in args


def test_restarts_back_off_from_half_a_second_to_thirty_and_reset_after_a_stable_run() -> None:
    supervisor = Supervisor(
        Settings(),
        SupervisorOptions(processes=2, child_args=("dispatch",), shutdown_grace_seconds=1.0),
    )
    child = _Child(1)
    delays = [supervisor._schedule_restart(child, ran_seconds=0.2) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert max(delays) == MAX_RESTART_DELAY_SECONDS
    assert supervisor._schedule_restart(child, ran_seconds=STABLE_AFTER_SECONDS) == 0.5
    assert supervisor.ready() is not None  # nothing started: not ready


def test_each_child_gets_a_distinct_dispatcher_id_from_a_configured_one() -> None:
    supervisor = Supervisor(
        Settings(),
        SupervisorOptions(
            processes=3,
            child_args=("dispatch",),
            shutdown_grace_seconds=1.0,
            dispatcher_id="eu-1",
        ),
    )
    ids = {supervisor._child_environment(_Child(n))["OUTBOX_DISPATCHER_ID"] for n in (1, 2, 3)}
    assert ids == {"eu-1/1", "eu-1/2", "eu-1/3"}

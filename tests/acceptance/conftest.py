"""Dispatcher subprocesses delivering to a loopback recording server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.file_recorder import FileRecorder

ROOT = Path(__file__).resolve().parents[2]
OUTBOX = str(Path(sys.executable).with_name("outbox"))


@pytest.fixture
def recorder(tmp_path: Path) -> FileRecorder:
    return FileRecorder(tmp_path / "deliveries.jsonl")


Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn_dispatcher(database_url: str, recorder: FileRecorder, tmp_path: Path) -> Iterator[Spawn]:
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, **env: str) -> subprocess.Popen[bytes]:
        environment = {
            **os.environ,
            "OUTBOX_DATABASE_URL": database_url,
            "OUTBOX_CHANNEL_PLUGINS": "email=tests.support.channels:file_email",
            "OUTBOX_TEST_RECORD_FILE": str(recorder.path),
            "OUTBOX_RATE_LIMITS": "off",
            "PYTHONPATH": str(ROOT),
            **env,
        }
        with open(tmp_path / f"dispatcher-{len(processes)}.log", "wb") as log:
            process = subprocess.Popen(
                [OUTBOX, "dispatch", *args], env=environment, cwd=ROOT, stdout=log, stderr=log
            )
        processes.append(process)
        return process

    yield spawn
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def history(admin: psycopg.Connection[Any], user: str) -> list[tuple[Any, ...]]:
    """A user's attempt log: (channel, outcome, error_class, attempt), oldest first."""
    return admin.execute(
        "SELECT channel, outcome, error_class, attempt FROM outbox.attempt"
        " WHERE user_id = %s ORDER BY id",
        [user],
    ).fetchall()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)

"""Readiness, liveness and a /metrics content type that Prometheus 3 parses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from outbox._migrate import downgrade
from outbox._schema_check import describe, head_revision
from outbox._settings import Secret, Settings
from outbox.api import create_app
from tests.support.pg_cluster import free_port

SECRET = "api-jwt-secret-for-the-health-tests-0123"
OUTBOX = str(Path(sys.executable).with_name("outbox"))


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Like Go's ``mime.ParseMediaType`` (what Prometheus 3 uses): a duplicate
    parameter is an error, and so is a parameter without ``=``."""
    media_type, *params = [part.strip() for part in value.split(";")]
    parsed: dict[str, str] = {}
    for param in params:
        if not param:
            continue
        key, sep, val = param.partition("=")
        if not sep:
            raise ValueError(f"mime: invalid media parameter {param!r}")
        key = key.strip().lower()
        if key in parsed:
            raise ValueError(f"mime: duplicate parameter name {key!r}")
        parsed[key] = val.strip().strip('"')
    return media_type.lower(), parsed


def test_the_strict_parser_refuses_what_prometheus_3_refuses() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        parse_media_type("text/plain; version=0.0.4; charset=utf-8; charset=utf-8")
    assert parse_media_type("text/plain; version=0.0.4; charset=utf-8") == (
        "text/plain",
        {"version": "0.0.4", "charset": "utf-8"},
    )


def settings_for(url: str) -> Settings:
    return Settings(database_url=url, api_jwt_secret=Secret(SECRET))


async def test_health_is_ready_livez_is_alive_and_metrics_has_one_charset(
    database_url: str,
) -> None:
    async with AsyncTestClient(app=create_app(settings_for(database_url))) as client:
        health = await client.get("/health")
        livez = await client.get("/livez")
        metrics = await client.get("/metrics")
    assert health.status_code == 200 and health.json()["database"] == "ok"
    assert livez.status_code == 200
    media_type, params = parse_media_type(metrics.headers["content-type"])
    assert media_type == "text/plain" and params["charset"] == "utf-8"
    assert set(params) == {"version", "charset"}


async def test_health_is_503_on_an_unmigrated_database_while_livez_stays_200(
    empty_database_url: str,
) -> None:
    async with AsyncTestClient(app=create_app(settings_for(empty_database_url))) as client:
        health = await client.get("/health")
        livez = await client.get("/livez")
        send = await client.post(
            "/api/v1/messaging/test",
            json={
                "user_id": "u1",
                "channel": "email",
                "template_name": "price_alert",
                "template_vars": {
                    "instrument": "X",
                    "trigger_price": "1",
                    "current_price": "1",
                    "condition": "above",
                },
            },
            headers={"Authorization": "Bearer " + owner_token()},
        )
    assert health.status_code == 503
    assert health.json()["database"] == "not_migrated"
    assert "run `outbox migrate`" in health.json()["detail"]
    assert livez.status_code == 200
    assert send.status_code == 503 and "outbox migrate" in send.json()["detail"]


def owner_token() -> str:
    import jwt

    claims = {"sub": "owner", "role": "owner", "exp": int(time.time()) + 300}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_a_schema_behind_head_is_named_with_both_revisions(database_url: str) -> None:
    downgrade(database_url, "outbox_0005")
    result = subprocess.run(
        [OUTBOX, "stats"],
        env={**os.environ, "OUTBOX_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"at outbox_0005 and this version needs {head_revision()}" in result.stderr
    assert "run `outbox migrate`" in result.stderr and "Traceback" not in result.stderr


def test_describe_accepts_a_database_ahead_of_the_code() -> None:
    # a rolling upgrade migrates first: dispatchers of the previous release keep going
    assert describe(True, "outbox_9999", "outbox_0006") is None
    assert describe(True, None, "outbox_0006") is None  # version table not readable
    assert describe(False, None, "outbox_0006") is not None


@pytest.mark.parametrize("command", [["stats"], ["dlq", "list"], ["dlq", "show", "1"]])
def test_commands_on_an_unmigrated_database_say_run_outbox_migrate(
    empty_database_url: str, command: list[str]
) -> None:
    result = subprocess.run(
        [OUTBOX, *command],
        env={**os.environ, "OUTBOX_DATABASE_URL": empty_database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "outbox: the database has no outbox schema: run `outbox migrate`"
    )


def test_a_dispatcher_on_an_unmigrated_database_logs_once_waits_and_starts_after_migrate(
    empty_database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "dispatcher.log"
    env = {**os.environ, "OUTBOX_DATABASE_URL": empty_database_url, "OUTBOX_POLL_INTERVAL": "0.2"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([OUTBOX, "dispatch"], env=env, stdout=log, stderr=log)
    try:
        time.sleep(7)  # more than one re-check
        early = log_path.read_text()
        assert early.count("run `outbox migrate`") == 1, early
        migrated = subprocess.run(
            [OUTBOX, "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert migrated.returncode == 0, migrated.stderr
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute("SELECT outbox.set_address('u1', 'email', 'u1@x.org')")
            conn.execute(
                "SELECT outbox.enqueue('email', 'price_alert', 'u1', %s::jsonb)",
                ['{"instrument":"X","trigger_price":"1","current_price":"1","condition":"above"}'],
            )
            deadline = time.monotonic() + 30
            attempts: Any = 0
            while time.monotonic() < deadline:
                attempts = conn.execute("SELECT count(*) FROM outbox.attempt").fetchone()
                if attempts and attempts[0]:
                    break
                time.sleep(0.3)
        assert attempts and attempts[0] >= 1, log_path.read_text()
        assert "the database is migrated now; starting" in log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def serving_dispatcher(database_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "OUTBOX_DATABASE_URL": database_url}
    process = subprocess.Popen(
        [OUTBOX, "dispatch", "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            get(f"{base}/livez")
            return process, base
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.2)


def test_dispatcher_metrics_port_serves_livez_readyz_and_one_charset(database_url: str) -> None:
    process, base = serving_dispatcher(database_url)
    try:
        status, content_type, _ = get(f"{base}/metrics")
        media_type, params = parse_media_type(content_type)
        assert status == 200 and media_type == "text/plain" and params["charset"] == "utf-8"
        assert get(f"{base}/livez")[0] == 200
        assert get(f"{base}/readyz")[:1] == (200,)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_dispatcher_readyz_is_503_until_the_database_is_migrated(
    empty_database_url: str,
) -> None:
    process, base = serving_dispatcher(empty_database_url)
    try:
        status, _, body = get(f"{base}/readyz")
        assert status == 503 and "run `outbox migrate`" in body
        assert get(f"{base}/livez")[0] == 200
        env = {**os.environ, "OUTBOX_DATABASE_URL": empty_database_url}
        subprocess.run([OUTBOX, "migrate"], env=env, check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 10
        while get(f"{base}/readyz")[0] != 200:
            assert time.monotonic() < deadline, "readyz stayed 503 after migrate"
            time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

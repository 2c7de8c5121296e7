"""Every setting with a fixed set of values refuses anything else, naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from outbox._errors import ConfigurationError
from outbox._settings import Settings, database_url

# (variable, a value it must refuse)
REFUSED = [
    ("OUTBOX_LISTEN", "no way"),
    ("OUTBOX_LISTEN", "maybe"),
    ("OUTBOX_LISTEN", "2"),
    ("OUTBOX_PREPARED_STATEMENTS", "disabled"),
    ("OUTBOX_SMTP_TLS", "ssl"),
    ("OUTBOX_SMTP_TLS", "STARTTLS please"),
    ("OUTBOX_RATE_LIMITS", "email=100"),
    ("OUTBOX_RATE_LIMITS", "sms=1/s"),
    ("OUTBOX_RATE_LIMITS", "email=100/fortnight"),
    ("OUTBOX_RETRY_DELAYS", "1,two,4"),
    ("OUTBOX_RETRY_DELAYS", "-1"),
    ("OUTBOX_MAX_ATTEMPTS", "0"),
    ("OUTBOX_MAX_ATTEMPTS", "five"),
    ("OUTBOX_LEASE_SECONDS", "0.5"),
    ("OUTBOX_LEASE_SECONDS", "30s"),
    ("OUTBOX_POLL_INTERVAL", "fast"),
    ("OUTBOX_DB_TIMEOUT", "0"),
    ("OUTBOX_SMTP_PORT", "0"),
    ("OUTBOX_SMTP_PORT", "smtp"),
    ("OUTBOX_SMTP_TIMEOUT", "forever"),
    ("OUTBOX_PUSH_TIMEOUT", "-1"),
    ("OUTBOX_PUSH_TTL", "-5"),
    ("OUTBOX_DATABASE_URL", "postgresql+asyncpg://u@h/db"),
    ("OUTBOX_DATABASE_URL", "mysql://u@h/db"),
    ("OUTBOX_DATABASE_URL", "host=h dbname=db"),
    ("OUTBOX_LISTEN_DATABASE_URL", "postgresql+psycopg2://u@h/db"),
    ("OUTBOX_FALLBACK_ON_FAILURE", "campaign"),
    ("OUTBOX_FALLBACK_ON_FAILURE", "yes"),
]


@pytest.mark.parametrize(("name", "value"), REFUSED)
def test_an_unknown_or_malformed_value_is_refused_naming_the_variable(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", "transactional"), ("transactional", "transactional"), (" ALL ", "all"), ("off", "off")],
)
def test_fallback_on_failure_takes_its_three_values(value: str, expected: str) -> None:
    settings = Settings.from_env({"OUTBOX_FALLBACK_ON_FAILURE": value})
    assert settings.fallback_on_failure == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(v, True) for v in ("on", "ON", "1", "true", "Yes")]
    + [(v, False) for v in ("off", "0", "false", "No", " OFF ")]
    + [("", True)],
)
def test_listen_accepts_the_documented_switch_values(value: str, expected: bool) -> None:
    assert Settings.from_env({"OUTBOX_LISTEN": value}).listen is expected


def test_the_accepted_switch_values_are_named_in_the_error() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"OUTBOX_LISTEN": "no way"})
    assert "on, 1, true, yes, off, 0, false, no" in str(refused.value)


def test_no_database_url_means_libpq_defaults_not_the_postgres_database() -> None:
    assert Settings.from_env({}).database_url == ""


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql+psycopg://u:p@db:5432/app", "postgresql://u:p@db:5432/app"),
        ("postgresql+psycopg3://u@db/app", "postgresql://u@db/app"),
        ("postgres+psycopg://u@db/app", "postgresql://u@db/app"),
        ("postgresql://u@db/app?sslmode=require", "postgresql://u@db/app?sslmode=require"),
        ("postgres://u@db/app", "postgres://u@db/app"),
        ("  ", ""),
    ],
)
def test_sqlalchemy_style_psycopg_urls_are_accepted(raw: str, expected: str) -> None:
    assert database_url(raw) == expected


def test_another_driver_is_refused_with_what_to_write() -> None:
    with pytest.raises(ConfigurationError) as refused:
        database_url("postgresql+asyncpg://u@db/app")
    assert "asyncpg" in str(refused.value) and "postgresql://" in str(refused.value)


def test_the_dispatcher_refuses_an_unknown_listen_value_in_one_line() -> None:
    env = {**os.environ, "OUTBOX_LISTEN": "maybe"}
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "dispatch", "--until-idle"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode != 0
    assert "OUTBOX_LISTEN" in result.stderr and "'maybe'" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

"""Every setting with a fixed set of values refuses anything else, naming the variable."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys

import pytest

from outbox._ack_tokens import verify
from outbox._errors import ConfigurationError, InvalidAckToken
from outbox._settings import Secret, Settings, database_url

# (variable, a value it must refuse)
REFUSED = [
    ("OUTBOX_LISTEN", "no way"),
    ("OUTBOX_LISTEN", "maybe"),
    ("OUTBOX_LISTEN", "2"),
    ("OUTBOX_PREPARED_STATEMENTS", "disabled"),
    ("OUTBOX_SMTP_TLS", "ssl"),
    ("OUTBOX_SMTP_TLS", "STARTTLS please"),
    ("OUTBOX_RATE_LIMITS", "email=100"),
    ("OUTBOX_SMS_ACCOUNT_SID", "AC123"),
    ("OUTBOX_SMS_FROM", "0044 20 7946 0000"),
    ("OUTBOX_SMS_MAX_SEGMENTS", "11"),
    ("OUTBOX_SMS_MAX_SEGMENTS", "0"),
    ("OUTBOX_SMS_API_URL", "ftp://api.twilio.com"),
    ("OUTBOX_SMS_API_URL", "http://api.twilio.com"),
    ("OUTBOX_SMS_TIMEOUT_SECONDS", "0"),
    ("OUTBOX_RATE_LIMITS", "Fax=1/s"),
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
    ("OUTBOX_API_PUBLIC_URL", "127.0.0.1:8000"),
    ("OUTBOX_API_PUBLIC_URL", "ftp://api.example.com"),
    ("OUTBOX_API_PUBLIC_URL", "https://"),
    ("OUTBOX_API_PUBLIC_URL", "https://api.example.com/?src=mail"),
    ("OUTBOX_API_PUBLIC_URL", "https://api.example.com/#top"),
    ("OUTBOX_API_PUBLIC_URL", "https://ops:pw@api.example.com"),
    ("OUTBOX_API_PUBLIC_URL", "https://api.example.com:99999"),
    ("OUTBOX_API_PUBLIC_URL", "https://api.example.com/a b"),
    ("OUTBOX_ACK_LINK_TTL", "0"),
    ("OUTBOX_ACK_LINK_TTL", "-60"),
    ("OUTBOX_ACK_LINK_TTL", "7d"),
    ("OUTBOX_ACK_LINK_TTL", "7776001"),
    ("OUTBOX_ACK_LINK_TTL", "inf"),
    ("OUTBOX_ACK_LINK_TTL", "nan"),
    ("OUTBOX_ACK_SECRET", "x" * 31),
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


# ------------------------------------------------------------------ ack links

JWT_SECRET = "jwt-secret-for-the-settings-tests-0123456789"
ACK_SECRET = "ack-secret-for-the-settings-tests-9876543210"
NOW = 1_790_000_000.0


def test_the_public_url_defaults_to_the_local_api() -> None:
    assert Settings.from_env({}).api_public_url == "http://127.0.0.1:8000"
    assert Settings.from_env({"OUTBOX_API_PUBLIC_URL": "  "}).api_public_url == (
        "http://127.0.0.1:8000"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://alerts.example.com/", "https://alerts.example.com"),
        ("https://alerts.example.com///", "https://alerts.example.com"),
        (" https://example.com/outbox/ ", "https://example.com/outbox"),
        ("HTTP://[::1]:8000", "HTTP://[::1]:8000"),
    ],
)
def test_the_public_url_loses_its_trailing_slash_and_keeps_a_path(raw: str, expected: str) -> None:
    assert Settings.from_env({"OUTBOX_API_PUBLIC_URL": raw}).api_public_url == expected
    # built directly as well as from the environment
    assert Settings(api_public_url=raw.strip()).api_public_url == expected


def test_a_refused_public_url_is_not_echoed_it_may_hold_a_password() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"OUTBOX_API_PUBLIC_URL": "https://ops:hunter2@api.example.com"})
    assert "OUTBOX_API_PUBLIC_URL" in str(refused.value) and "hunter2" not in str(refused.value)


def test_a_short_ack_secret_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"OUTBOX_ACK_SECRET": "s3cr3t-but-short"})
    assert "at least 32" in str(refused.value) and "s3cr3t" not in str(refused.value)


@pytest.mark.parametrize(
    ("raw", "expected"), [("", 604_800.0), ("3600", 3600.0), ("7776000", 7_776_000.0)]
)
def test_the_ack_link_ttl_is_seconds_up_to_90_days(raw: str, expected: float) -> None:
    assert Settings.from_env({"OUTBOX_ACK_LINK_TTL": raw}).ack_link_ttl == expected


def test_without_either_secret_there_is_no_signing_key_and_no_link() -> None:
    settings = Settings.from_env({})

    assert settings.ack_signing_key() is None
    assert settings.ack_url(42) is None


def test_the_signing_key_is_derived_from_the_jwt_secret_when_no_ack_secret_is_set() -> None:
    settings = Settings.from_env({"OUTBOX_API_JWT_SECRET": JWT_SECRET})
    expected = hmac.new(JWT_SECRET.encode(), b"outbox ack link v1", hashlib.sha256).digest()

    assert settings.ack_signing_key() == expected
    assert JWT_SECRET.encode() not in expected


def test_the_ack_secret_wins_over_the_jwt_secret() -> None:
    settings = Settings.from_env(
        {"OUTBOX_API_JWT_SECRET": JWT_SECRET, "OUTBOX_ACK_SECRET": ACK_SECRET}
    )
    expected = hmac.new(ACK_SECRET.encode(), b"outbox ack link v1", hashlib.sha256).digest()

    assert settings.ack_signing_key() == expected
    # a dispatcher and an API configured alike derive the same key
    assert Settings(ack_secret=Secret(ACK_SECRET)).ack_signing_key() == expected


def test_an_ack_url_is_the_public_url_and_a_token_for_that_message_valid_for_the_ttl() -> None:
    settings = Settings.from_env(
        {
            "OUTBOX_API_JWT_SECRET": JWT_SECRET,
            "OUTBOX_API_PUBLIC_URL": "https://alerts.example.com/outbox/",
            "OUTBOX_ACK_LINK_TTL": "3600",
        }
    )
    key = settings.ack_signing_key()
    assert key is not None

    url = settings.ack_url(42, now=NOW)

    assert url is not None
    prefix = "https://alerts.example.com/outbox/ack/"
    assert url.startswith(prefix)
    token = url.removeprefix(prefix)
    assert verify(token, key=key, now=NOW + 3599) == 42
    with pytest.raises(InvalidAckToken):
        verify(token, key=key, now=NOW + 3600)


def test_no_secret_or_key_shows_in_the_settings_repr() -> None:
    settings = Settings.from_env(
        {"OUTBOX_API_JWT_SECRET": JWT_SECRET, "OUTBOX_ACK_SECRET": ACK_SECRET}
    )
    key = settings.ack_signing_key()
    assert key is not None

    shown = repr(settings) + str(settings)

    assert "ack_secret=Secret('********')" in shown
    for leak in (
        ACK_SECRET,
        JWT_SECRET,
        key.hex(),
        repr(key),
        base64.urlsafe_b64encode(key).decode(),
    ):
        assert leak not in shown


def test_sms_settings_are_read_and_the_auth_token_never_shows() -> None:
    settings = Settings.from_env(
        {
            "OUTBOX_SMS_ACCOUNT_SID": "AC" + "0" * 32,
            "OUTBOX_SMS_AUTH_TOKEN": "twilio-auth-token-value",
            "OUTBOX_SMS_FROM": "+15005550006",
            "OUTBOX_SMS_API_URL": "https://twilio.example/",
            "OUTBOX_RATE_LIMITS": "sms=1/s",
        }
    )
    assert settings.sms_configured
    assert settings.sms_api_url == "https://twilio.example"
    assert settings.sms_max_segments == 4
    assert settings.rate_limits["sms"].per_second == 1.0
    assert "twilio-auth-token-value" not in repr(settings)
    # no public URL named: Twilio is not asked to call back a loopback default
    assert settings.sms_status_callback_url is None
    public = Settings.from_env({"OUTBOX_API_PUBLIC_URL": "https://outbox.example/"})
    assert public.sms_status_callback_url == "https://outbox.example/api/v1/webhooks/sms"


def test_a_messaging_service_sid_is_a_valid_sender() -> None:
    assert Settings.from_env({"OUTBOX_SMS_FROM": "MG" + "a" * 32}).sms_from == "MG" + "a" * 32


def test_any_channels_name_is_a_rate_limit_key() -> None:
    """A plugin's channel (and sms) is limited like the built-ins."""
    from outbox._settings import parse_rate_limits

    limits = parse_rate_limits("chat=10/s,sms=1/s,email=100/m,telegram_chat=1/s")
    assert sorted(limits) == ["chat", "email", "sms", "telegram_chat"]
    assert limits["chat"].count == 10 and limits["chat"].per_seconds == 1.0
    with pytest.raises(ConfigurationError):
        parse_rate_limits("Chat=10/s")

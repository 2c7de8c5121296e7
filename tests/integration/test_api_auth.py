"""API authentication: a strong secret, optional audience and issuer, and a limit on
failed authentications per client address."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from litestar.testing import AsyncTestClient

from outbox._errors import ConfigurationError
from outbox._settings import Secret, Settings
from outbox.api import create_app
from tests.support.pg_cluster import free_port

OUTBOX = str(Path(sys.executable).with_name("outbox"))
SECRET = "api-jwt-secret-for-the-auth-tests-0123456789"
URL = "/api/v1/messaging/test"
BODY = {
    "user_id": "nobody",  # unknown: an authenticated owner gets 404, not 401
    "channel": "email",
    "template_name": "price_alert",
    "template_vars": {
        "instrument": "EURUSD",
        "trigger_price": "1.1",
        "current_price": "1.2",
        "condition": "above",
    },
}


def owner_token(secret: str = SECRET, **claims: Any) -> str:
    payload = {"sub": "owner-1", "role": "owner", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("secret", ["", "short", "x" * 31, "é" * 15])
def test_a_secret_shorter_than_32_bytes_refuses_to_build_the_app(
    database_url: str, secret: str
) -> None:
    with pytest.raises(ConfigurationError, match="OUTBOX_API_JWT_SECRET"):
        create_app(Settings(database_url=database_url, api_jwt_secret=Secret(secret)))


def test_outbox_api_with_a_short_secret_exits_with_one_clear_line(database_url: str) -> None:
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_API_JWT_SECRET": "x" * 31,
    }
    result = subprocess.run(
        [OUTBOX, "api", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "OUTBOX_API_JWT_SECRET is 31 bytes; at least 32" in result.stderr
    assert "Traceback" not in result.stderr and "x" * 31 not in result.stderr


@pytest.fixture
def strict_settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        api_jwt_secret=Secret(SECRET),
        api_jwt_audience="outbox-api",
        api_jwt_issuer="trading-auth",
        api_auth_failures_per_minute=100,
    )


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"aud": "outbox-api", "iss": "trading-auth"}, 404),
        ({}, 401),
        ({"aud": "outbox-api"}, 401),
        ({"iss": "trading-auth"}, 401),
        ({"aud": "another-api", "iss": "trading-auth"}, 401),
        ({"aud": "outbox-api", "iss": "someone-else"}, 401),
    ],
)
async def test_audience_and_issuer_are_checked_when_configured(
    strict_settings: Settings, claims: dict[str, str], status: int
) -> None:
    async with AsyncTestClient(app=create_app(strict_settings)) as client:
        response = await client.post(URL, json=BODY, headers=headers(owner_token(**claims)))
    assert response.status_code == status, response.text


async def test_without_audience_and_issuer_settings_tokens_need_neither(
    strict_settings: Settings,
) -> None:
    relaxed = replace(strict_settings, api_jwt_audience=None, api_jwt_issuer=None)
    async with AsyncTestClient(app=create_app(relaxed)) as client:
        response = await client.post(URL, json=BODY, headers=headers(owner_token()))
    assert response.status_code == 404, response.text


@pytest.fixture
def api_server(database_url: str) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_API_JWT_SECRET": SECRET,
        "OUTBOX_API_AUTH_FAILURES_PER_MINUTE": "3",
    }
    process = subprocess.Popen(
        [OUTBOX, "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/schema", timeout=1):
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def client_from(address: str, base: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=base, transport=transport, timeout=10)


def test_failed_authentications_are_limited_per_client_address(api_server: str) -> None:
    forged = headers(owner_token(secret="a-guessed-secret-that-is-long-enough-000"))
    with client_from("127.0.0.1", api_server) as attacker:
        answers = [attacker.post(URL, json=BODY, headers=forged).status_code for _ in range(3)]
        assert answers == [401, 401, 401]
        refused = attacker.post(URL, json=BODY, headers=forged)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # even a good token from that address waits: the address is what is limited
        assert attacker.post(URL, json=BODY, headers=headers(owner_token())).status_code == 429
    with client_from("127.0.0.2", api_server) as colleague:
        answer = colleague.post(URL, json=BODY, headers=headers(owner_token()))
        assert answer.status_code == 404, answer.text  # authenticated: the user is unknown

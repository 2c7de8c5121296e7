"""Property-based fuzzing of the API against its own OpenAPI schema (schemathesis).

Every operation is called with generated bodies, valid and not, under an owner's
token. Allowed: any documented answer. Not allowed: a 5xx other than the
documented 502, or an answer that contradicts the schema (status code, content
type, headers, body shape).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jwt
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from outbox._settings import Secret, Settings
from outbox.api import create_app
from tests.support.channels import RecordingChannel

SECRET = "api-jwt-secret-for-fuzzing-0123456789abc"


def owner_token() -> str:
    return jwt.encode(
        {"sub": "fuzzer", "role": "owner", "exp": int(time.time() + 600)}, SECRET, algorithm="HS256"
    )


@pytest.fixture
def api_schema(database_url: str, admin: psycopg.Connection[Any]) -> Iterator[Any]:
    admin.execute(
        "SELECT outbox.set_address('u1', 'email', 'u1@example.com'),"
        " outbox.set_address('u1', 'telegram', '42')"
    )
    app = create_app(
        Settings(
            database_url=database_url,
            api_jwt_secret=Secret(SECRET),
            # the providers' webhooks configured: they answer 400/403, not 503
            api_public_url="https://outbox.example",
            sms_auth_token=Secret("twilio-auth-token-for-fuzzing"),
            mailgun_webhook_signing_key=Secret("mailgun-signing-key-for-fuzzing"),
        ),
        channels={name: RecordingChannel(name) for name in ("email", "telegram", "push")},
        rate_limit_per_minute=100_000,
    )
    try:
        yield schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()  # close the app's pool before its database is dropped


def check(case: Any) -> None:
    response = case.call(headers={"Authorization": f"Bearer {owner_token()}"})

    assert response.status_code < 500 or response.status_code == 502, response.text
    # schema-valid bodies may still name an unknown user or template (404/400)
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


# schemathesis' own strategies call the random module, which Hypothesis deprecates
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_answers_every_generated_request_as_its_schema_documents(
    api_schema: Any, mode: GenerationMode
) -> None:
    # schemathesis' pytest plugin does not load under this pytest; drive Hypothesis directly
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/messaging/test", "/health"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to break in a request without parameters or body
        if mode is GenerationMode.NEGATIVE and operation.path.startswith("/api/v1/webhooks/"):
            # the providers' bodies are not described (the signature is their schema):
            # nothing to break either; tests/integration/test_webhooks.py sends bad ones
            continue
        run = given(operation.as_strategy(generation_mode=mode))(check)
        settings(
            max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )(run)()

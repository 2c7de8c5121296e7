"""Who may call the API: JWT bearer tokens, the owner role, a per-caller rate limit.

Tokens are HS256 JWTs signed with ``OUTBOX_API_JWT_SECRET`` carrying ``sub``,
``role`` and ``exp``. Litestar's :class:`~litestar.security.jwt.JWTAuth` verifies
them: only HS256 is accepted, so ``alg: none`` and any other algorithm are
refused; a wrong signature, an expired token, a missing claim or a missing header
answer 401. :func:`owner_only` answers 403 unless ``role`` is ``owner``.

The rate limit counts requests per token subject (the caller), in this process's
memory; a refused request answers 429 with ``Retry-After``. The secret never
appears in a response, a log line or a metric.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.rate_limit import RateLimitConfig, get_remote_address
from litestar.security.jwt import JWTAuth, Token
from litestar.security.jwt.token import JWTDecodeOptions

from outbox._errors import ConfigurationError

OWNER_ROLE = "owner"
REQUIRED_CLAIMS = ("sub", "role", "exp")
SECURITY_SCHEME = "BearerToken"
"""The OpenAPI security scheme's name."""
PUBLIC_PATHS = ["^/health$", "^/metrics$", "^/schema"]
"""Paths served without a token (Litestar ``exclude`` patterns)."""


@dataclass
class OwnerToken(Token):
    """A verified token: ``sub``, ``exp`` and the ``role`` claim; ``iat`` is optional.

    Litestar's :class:`Token` insists on ``iat``; the platform's tokens need not
    carry it, so a missing ``iat`` is read as "issued now" (it is informational:
    expiry is what is enforced).
    """

    role: str = ""

    @classmethod
    def decode_payload(
        cls,
        encoded_token: str,
        secret: str,
        algorithms: list[str],
        issuer: str | Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        options: JWTDecodeOptions | None = None,
    ) -> Any:
        """Verify with PyJWT (signature, algorithm, expiry, required claims)."""
        payload = super().decode_payload(
            encoded_token, secret, algorithms, issuer=issuer, audience=audience, options=options
        )
        if isinstance(payload, dict):
            payload.setdefault("iat", int(time.time()))
        return payload


async def _token_as_user(token: Token, connection: ASGIConnection[Any, Any, Any, Any]) -> Token:
    """Return the verified token as the caller: there is no user table to consult."""
    return token


def jwt_auth(secret: str) -> JWTAuth[Token, Token]:
    """Build the JWT configuration; an empty secret is a configuration error."""
    if not secret:
        raise ConfigurationError("OUTBOX_API_JWT_SECRET must be set to serve the API")
    return JWTAuth[Token, Token](
        token_secret=secret,
        token_cls=OwnerToken,
        retrieve_user_handler=_token_as_user,
        algorithm="HS256",
        require_claims=list(REQUIRED_CLAIMS),
        exclude=PUBLIC_PATHS,
        openapi_security_scheme_name=SECURITY_SCHEME,
        description="HS256 JWT with claims sub, role and exp; role must be owner.",
    )


def owner_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: 401 without a verified token, 403 unless its ``role`` claim is ``owner``."""
    token = connection.scope.get("auth")
    if not isinstance(token, OwnerToken):
        raise NotAuthorizedException("a bearer token is required")
    if token.role != OWNER_ROLE:
        raise PermissionDeniedException("only the owner may send test messages")


def caller_of(request: Request[Any, Any, Any]) -> str:
    """Rate-limit key: the token subject, else the client address."""
    token = request.scope.get("auth")
    if isinstance(token, Token):
        return f"sub:{token.sub}"
    return f"addr:{get_remote_address(request)}"


def rate_limit(per_minute: int) -> RateLimitConfig:
    """At most ``per_minute`` calls per caller and minute (in-memory, per process)."""
    if per_minute < 1:
        raise ConfigurationError("the API rate limit must allow at least one call a minute")
    return RateLimitConfig(
        rate_limit=("minute", per_minute),
        identifier_for_request=caller_of,
        store="api_rate_limit",
    )

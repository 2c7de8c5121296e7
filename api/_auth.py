"""Who may call the API: JWT bearer tokens, two roles, a per-caller rate limit.

Tokens are HS256 JWTs signed with ``OUTBOX_API_JWT_SECRET`` carrying ``sub``,
``role`` and ``exp``. Litestar's :class:`~litestar.security.jwt.JWTAuth` verifies
them: only HS256 is accepted, so ``alg: none`` and any other algorithm are
refused; a wrong signature, an expired token, a missing claim or a missing header
answer 401. Two roles, and neither may use the other's routes (403):
:func:`owner_only` guards the owner's routes (``role: "owner"``), :func:`user_only`
the users' own (``role: "user"``, ``sub`` = the user id: every such route reads
and changes only that user's rows, whatever ids the request names).

The rate limit counts requests per token subject (the caller), in this process's
memory; a refused request answers 429 with ``Retry-After``. Failed authentications
are limited per client address too (:class:`FailedAuthLimit`): someone guessing
tokens is refused before the signature is even checked. The secret must be at least
32 bytes (HS256 keys shorter than the hash are guessable offline from one token) and
never appears in a response, a log line or a metric; when ``OUTBOX_API_JWT_AUDIENCE``
or ``OUTBOX_API_JWT_ISSUER`` is set, tokens must carry that ``aud`` / ``iss``.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.rate_limit import RateLimitConfig, get_remote_address
from litestar.security.jwt import JWTAuth, Token
from litestar.security.jwt.token import JWTDecodeOptions
from litestar.types import ASGIApp, HTTPResponseStartEvent, Message, Receive, Scope, Send

from outbox._errors import ConfigurationError

MIN_SECRET_BYTES = 32
OWNER_ROLE = "owner"
USER_ROLE = "user"
MAX_USER_ID = 255
"""The longest ``user_id`` outbox stores (``outbox.recipient``, ``outbox.inbox_item``)."""
REQUIRED_CLAIMS = ("sub", "role", "exp")
SECURITY_SCHEME = "BearerToken"
"""The OpenAPI security scheme's name."""
PUBLIC_PATHS = ["^/health$", "^/livez$", "^/metrics$", "^/schema", "^/ack/", "^/static/"]
"""Paths served without a token (Litestar ``exclude`` patterns); ``/ack/`` links carry
their own signed token; ``/static/`` is the browser client (public files)."""


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


def jwt_auth(
    secret: str, *, audience: str | None = None, issuer: str | None = None
) -> JWTAuth[Token, Token]:
    """Build the JWT configuration; a missing or short secret is a configuration error."""
    if not secret:
        raise ConfigurationError("OUTBOX_API_JWT_SECRET must be set to serve the API")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"OUTBOX_API_JWT_SECRET is {len(secret.encode())} bytes; at least"
            f" {MIN_SECRET_BYTES} are required (e.g. python -c"
            ' "import secrets; print(secrets.token_urlsafe(48))")'
        )
    claims = list(REQUIRED_CLAIMS)
    if audience:
        claims.append("aud")
    if issuer:
        claims.append("iss")
    return JWTAuth[Token, Token](
        token_secret=secret,
        token_cls=OwnerToken,
        retrieve_user_handler=_token_as_user,
        algorithm="HS256",
        accepted_audiences=[audience] if audience else None,
        accepted_issuers=[issuer] if issuer else None,
        require_claims=claims,
        exclude=PUBLIC_PATHS,
        openapi_security_scheme_name=SECURITY_SCHEME,
        description=(
            "HS256 JWT with claims sub, role and exp. Role owner: the owner's routes;"
            " role user (sub = the user id): the user's own routes."
        ),
    )


def owner_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: 401 without a verified token, 403 unless its ``role`` claim is ``owner``."""
    token = connection.scope.get("auth")
    if not isinstance(token, OwnerToken):
        raise NotAuthorizedException("a bearer token is required")
    if token.role != OWNER_ROLE:
        raise PermissionDeniedException("only the owner may use this route")


def user_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: 401 without a verified token or without a usable ``sub`` (the user id),
    403 unless its ``role`` claim is ``user``.
    """
    user_of(connection)
    token = connection.scope["auth"]
    if token.role != USER_ROLE:
        # the owner too: the owner's token names the owner, not a user whose rows it is
        raise PermissionDeniedException("only a user (role user) may use this route")


def user_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The user id the caller's token names (``sub``); 401 when there is none.

    Only this id reaches the database: a route never takes a user id from the
    request, so no request can name another user's rows.
    """
    token = connection.scope.get("auth")
    if not isinstance(token, OwnerToken):
        raise NotAuthorizedException("a bearer token is required")
    sub = token.sub
    if not sub or len(sub) > MAX_USER_ID or "\x00" in sub or not _encodable(sub):
        raise NotAuthorizedException("the token's sub is not a user id")
    return sub


def _encodable(text: str) -> bool:
    """False for a lone surrogate (JSON can spell one; PostgreSQL cannot store it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


class FailedAuthLimit:
    """At most ``per_minute`` failed authentications (401) per client address.

    An ASGI middleware placed before the JWT check: an address over its budget gets
    429 with ``Retry-After`` without its token being looked at, so guessing tokens
    (or secrets) from one address is slow, while other addresses are unaffected. In
    this process's memory, like the request rate limit; at most ``max_addresses``
    addresses are remembered (the oldest are forgotten first).

    The acknowledgement link handler keeps an instance of its own, without the
    middleware: it asks :meth:`retry_after` first and reports the links that do not
    verify with :meth:`record_failure`.
    """

    WINDOW_SECONDS = 60.0

    def __init__(self, per_minute: int, *, max_addresses: int = 10_000) -> None:
        if per_minute < 1:
            raise ConfigurationError("OUTBOX_API_AUTH_FAILURES_PER_MINUTE must be at least 1")
        self.per_minute = per_minute
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0 when it may now)."""
        failures = self._failures.get(address)
        if failures is None:
            return 0.0
        while failures and failures[0] <= now - self.WINDOW_SECONDS:
            failures.popleft()
        if len(failures) < self.per_minute:
            return 0.0
        return failures[0] + self.WINDOW_SECONDS - now

    def record_failure(self, address: str, now: float) -> None:
        failures = self._failures.pop(address, None) or deque()
        failures.append(now)
        self._failures[address] = failures  # most recent last
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """The ASGI middleware factory (Litestar ``middleware=[...]``)."""

        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            address = client_address(scope)
            wait = self.retry_after(address, time.monotonic())
            if wait > 0:
                await _refuse(send, wait)
                return

            async def observed(message: Message) -> None:
                if message["type"] == "http.response.start" and message["status"] == 401:
                    self.record_failure(address, time.monotonic())
                await send(message)

            try:
                await app(scope, receive, observed)
            except NotAuthorizedException:
                # the JWT middleware raises; Litestar turns it into the 401 outside us
                self.record_failure(address, time.monotonic())
                raise

        return limited


def client_address(scope: Scope) -> str:
    """The address failures are counted by: the peer of the connection."""
    client = scope.get("client")
    return client[0] if client else "unknown"


async def _refuse(send: Send, wait: float) -> None:
    body = json.dumps(
        {"status_code": 429, "detail": "too many failed authentications from this address"}
    ).encode()
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 429,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, math.ceil(wait))).encode()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})

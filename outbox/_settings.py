"""Settings: one object per process, built from ``OUTBOX_*`` variables at start-up.

Nothing here reads the environment at import time; call :meth:`Settings.from_env`
once in the entry point and pass the object down.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit

from outbox._ack_tokens import sign
from outbox._errors import ConfigurationError
from outbox.vocabulary import CHANNEL_NAME

SmtpTls = Literal["none", "starttls", "tls"]
FallbackOnFailure = Literal["transactional", "all", "off"]
FALLBACK_ON_FAILURE: tuple[FallbackOnFailure, ...] = ("transactional", "all", "off")

DEFAULT_DATABASE_URL = ""
"""Empty: libpq's own defaults and ``PG*`` variables (``PGHOST``, ``PGDATABASE``, ...)."""
DEFAULT_PUSH_ALLOWED_HOSTS = (
    "fcm.googleapis.com",
    "android.googleapis.com",
    "updates.push.services.mozilla.com",
    "*.push.services.mozilla.com",
    "*.notify.windows.com",
    "web.push.apple.com",
    "*.push.apple.com",
)


DEFAULT_API_PUBLIC_URL = "http://127.0.0.1:8000"
DEFAULT_SMS_API_URL = "https://api.twilio.com"
DEFAULT_SMS_MAX_SEGMENTS = 4
"""Four segments: 612 GSM-7 characters or 268 UCS-2 code units, more than any
built-in alert needs; a longer text is a template or producer bug that would bill
the platform per segment."""
MAX_SMS_SEGMENTS = 10
"""Twilio refuses bodies over 1600 characters (10 segments of GSM-7)."""
_TWILIO_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_TWILIO_MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
DEFAULT_ACK_LINK_TTL = 7 * 86400.0
DEFAULT_LINGER_SECONDS = 0.005
"""``OUTBOX_LINGER_SECONDS``. While producers commit steadily, a dispatcher that
went to sleep after every small claim would have each of their commits send it a
NOTIFY (PostgreSQL serializes notifying commits on one lock) and would claim a few
messages per transaction; lingering this long takes what arrived meanwhile as one
batch, and no producer notifies (``bench/RESULTS.md``, "producer")."""
MAX_ACK_LINK_TTL = 90 * 86400.0
"""A link in a mailbox stays usable that long at most: past it, the alert is old news."""
MIN_ACK_SECRET_BYTES = 32
"""As for the JWT secret: a token carries its MAC and the data it covers, so a shorter
secret can be searched offline from one link."""
ACK_KEY_LABEL = b"outbox ack link v1"
"""What the ack signing key is derived for: a key derived from the JWT secret signs
nothing a JWT check would accept, and no JWT is an ack token."""


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value; call only where it is handed to a provider."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """At most ``count`` events per ``per_seconds``."""

    count: int
    per_seconds: float

    def __post_init__(self) -> None:
        if self.count <= 0 or self.per_seconds <= 0:
            raise ConfigurationError("a rate limit needs a positive count and period")

    @property
    def per_second(self) -> float:
        """The sustained rate in events per second."""
        return self.count / self.per_seconds


_RATE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*=\s*(\d+)\s*/\s*(\d*)\s*([smh])\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
RATE_LIMIT_KEYS = ("email", "telegram", "telegram_chat", "push")
"""The keys outbox knows; any other channel's name (sms, a plugin's) is a key too."""
DEFAULT_RATE_LIMITS = "email=100/m,telegram=20/s,telegram_chat=1/s"


def parse_rate_limits(text: str) -> dict[str, RateLimit]:
    """Parse ``email=100/m,telegram=20/s,telegram_chat=1/s`` (or ``off``)."""
    if text.strip().lower() == "off":
        return {}
    limits: dict[str, RateLimit] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _RATE.match(item)
        if not match:
            raise ConfigurationError(
                f"OUTBOX_RATE_LIMITS: cannot read {item!r}; expected e.g. 'telegram=20/s'"
            )
        key, count, multiple, unit = match.groups()
        if key not in RATE_LIMIT_KEYS and not CHANNEL_NAME.match(key):
            raise ConfigurationError(
                f"OUTBOX_RATE_LIMITS: unknown key {key!r}; expected a channel's name"
                f" ({', '.join(RATE_LIMIT_KEYS)}, or a plugin's) or telegram_chat"
            )
        period = float(multiple or 1) * _UNIT_SECONDS[unit]
        limits[key] = RateLimit(count=int(count), per_seconds=period)
    return limits


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Parse ``90s``, ``15m``, ``12h``, ``7d`` or ``2w`` into seconds.

    The unit is required: ``purge --older-than 7`` once meant seven seconds to the
    code and seven days to the operator, and deleted every dead letter.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise ConfigurationError(
            f"cannot read duration {text!r}: write a number and a unit,"
            " s, m, h, d or w (e.g. 30s, 15m, 12h, 7d, 2w)"
        )
    value, unit = match.groups()
    return float(value) * _DURATION_UNITS[unit]


def _delays(text: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigurationError(
            f"OUTBOX_RETRY_DELAYS: cannot read {text!r}; expected seconds like 1,2,4,8,16"
        ) from None
    if not delays or any(d < 0 for d in delays):
        raise ConfigurationError("OUTBOX_RETRY_DELAYS needs at least one non-negative delay")
    return delays


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, not {value}")
    return value


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    minimum: float = 0.0,
    maximum: float | None = None,
) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {raw!r}") from None
    # float() takes "nan" and "inf": neither is a duration (a NaN passes every
    # comparison below and would reach asyncio's timers)
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, not {raw!r}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum}, not {value}")
    return value


SWITCH_ON = ("on", "1", "true", "yes")
SWITCH_OFF = ("off", "0", "false", "no")


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in SWITCH_ON:
        return True
    if raw in SWITCH_OFF:
        return False
    raise ConfigurationError(
        f"{name} must be one of {', '.join(SWITCH_ON + SWITCH_OFF)}, not {env.get(name)!r}"
    )


_SCHEMES = ("postgresql://", "postgres://")


def database_url(raw: str | None, name: str = "OUTBOX_DATABASE_URL") -> str:
    """A libpq connection string from ``raw``; empty means libpq's defaults (``PG*``).

    A SQLAlchemy-style ``postgresql+psycopg://`` URL, as a host application's own
    configuration writes it, is accepted and rewritten; any other driver is refused.
    """
    url = (raw or "").strip()
    if not url:
        return ""
    head, sep, rest = url.partition("://")
    if sep and "+" in head:
        scheme, _, driver = head.partition("+")
        if scheme in ("postgresql", "postgres") and driver in ("psycopg", "psycopg3"):
            return f"postgresql://{rest}"
        raise ConfigurationError(
            f"{name}: the driver {driver!r} in {head}:// is not one outbox uses;"
            f" write postgresql://{'...' if rest else ''} (or postgresql+psycopg://)"
        )
    if not url.startswith(_SCHEMES):
        shown = f"{head}://..." if sep else "a key=value string"
        raise ConfigurationError(
            f"{name} must be a postgresql:// URL (or empty for libpq's PG* defaults), not {shown}"
        )
    return url


def public_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the API's public address, or None when it can.

    Links in messages are built on it, so it is an absolute http(s) URL (a path, for
    a reverse proxy's prefix, is fine) with nothing a link would carry along by
    accident: no query, no fragment, no credentials, no whitespace.
    """
    if any(char.isspace() for char in url):
        return "it contains whitespace"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError:
        return "it is not a URL"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "it must start with http:// or https:// and name a host"
    if "?" in url or "#" in url:
        return "it must have no query (?) or fragment (#)"
    if "@" in parts.netloc:
        return "it must carry no user name or password"
    return None


def _list(raw: str | None) -> tuple[str, ...]:
    if not raw:
        return ()
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every ``OUTBOX_*`` setting, validated."""

    database_url: str = DEFAULT_DATABASE_URL

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: Secret = field(default_factory=lambda: Secret(""))
    smtp_from: str = "alerts@localhost"
    smtp_tls: SmtpTls = "none"
    smtp_allowed_senders: tuple[str, ...] = ()
    smtp_timeout: float = 30.0

    telegram_bot_token: Secret = field(default_factory=lambda: Secret(""))
    telegram_api_url: str = "https://api.telegram.org"

    sms_api_url: str = DEFAULT_SMS_API_URL
    """The Twilio REST API's base URL (a stand-in's in tests); no trailing slash."""
    sms_account_sid: str = ""
    sms_auth_token: Secret = field(default_factory=lambda: Secret(""))
    """Signs Twilio's status callbacks too (the API verifies them with it)."""
    sms_from: str = ""
    """The sender: an E.164 number, or a Messaging Service SID (``MG`` + 32 hex)."""
    sms_max_segments: int = DEFAULT_SMS_MAX_SEGMENTS
    sms_timeout_seconds: float = 10.0

    mailgun_webhook_signing_key: Secret = field(default_factory=lambda: Secret(""))
    """Mailgun's HTTP webhook signing key: verifies the email bounce webhook."""

    vapid_private_key: Secret = field(default_factory=lambda: Secret(""))
    vapid_public_key: str = ""
    vapid_subject: str = "mailto:alerts@localhost"
    push_allowed_hosts: tuple[str, ...] = DEFAULT_PUSH_ALLOWED_HOSTS
    push_timeout: float = 10.0
    push_ttl: int = 3600

    api_jwt_secret: Secret = field(default_factory=lambda: Secret(""))
    api_jwt_audience: str | None = None
    api_jwt_issuer: str | None = None
    api_auth_failures_per_minute: int = 10
    """Failed authentications (401) one client address may cause per minute."""
    templates_dir: Path | None = None
    platform_base_url: str = "https://platform.example.com"
    api_public_url: str = DEFAULT_API_PUBLIC_URL
    """Where recipients and providers reach the API (links in messages); no trailing
    slash."""
    api_public_url_configured: bool | None = None
    """Whether ``OUTBOX_API_PUBLIC_URL`` was set, rather than defaulted to loopback:
    provider webhooks (Twilio's status callbacks) are only asked for, and only
    accepted, at an address the operator named. None: decided from the URL (any
    other than the default counts as set)."""
    ack_secret: Secret = field(default_factory=lambda: Secret(""))
    """Signs acknowledgement links; when empty, ``api_jwt_secret`` does (through a
    derived key, see :meth:`ack_signing_key`)."""
    ack_link_ttl: float = DEFAULT_ACK_LINK_TTL
    """Seconds an acknowledgement link stays valid after the message is rendered."""

    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    max_attempts: int = 5
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    linger: float = DEFAULT_LINGER_SECONDS
    """Seconds a dispatcher whose claim found some messages, but not a full batch,
    waits before it claims again, instead of going to sleep on LISTEN (0: claims
    again at once, and sleeps once a claim finds nothing)."""
    rate_limits: Mapping[str, RateLimit] = field(
        default_factory=lambda: parse_rate_limits(DEFAULT_RATE_LIMITS)
    )
    dispatcher_id: str | None = None
    listen: bool = True
    db_timeout: float = 15.0
    """Seconds one database round trip of the dispatcher or the API may take before
    the connection is treated as dead (cancelled, closed, replaced)."""
    listen_database_url: str | None = None
    """A direct connection for LISTEN when ``database_url`` goes through a
    transaction-pooling PgBouncer (LISTEN needs a session of its own)."""
    fallback_on_failure: FallbackOnFailure = "transactional"
    """Which lanes hand a message that dies on its channel (a permanent failure, or
    its last attempt failed) to the next reachable channel of its chain instead of
    the dead letters: ``transactional`` (alerts), ``all``, or ``off``."""
    prepared_statements: bool = True
    """Off behind PgBouncer in transaction mode (before 1.21): no server-side
    prepared statements on the dispatcher's and the API's connections."""

    def __post_init__(self) -> None:
        if self.smtp_tls not in ("none", "starttls", "tls"):
            raise ConfigurationError(
                f"OUTBOX_SMTP_TLS must be none, starttls or tls, not {self.smtp_tls!r}"
            )
        if self.fallback_on_failure not in FALLBACK_ON_FAILURE:
            raise ConfigurationError(
                f"OUTBOX_FALLBACK_ON_FAILURE must be one of {', '.join(FALLBACK_ON_FAILURE)},"
                f" not {self.fallback_on_failure!r}"
            )
        if self.max_attempts < 1:
            raise ConfigurationError("OUTBOX_MAX_ATTEMPTS must be at least 1")
        if self.lease_seconds < 1:
            raise ConfigurationError("OUTBOX_LEASE_SECONDS must be at least 1")
        if self.db_timeout <= 0:
            raise ConfigurationError("OUTBOX_DB_TIMEOUT must be positive")
        problem = public_url_problem(self.api_public_url)
        if problem is not None:
            # the value is not echoed: a refused URL may be one that carries a password
            raise ConfigurationError(f"OUTBOX_API_PUBLIC_URL is refused: {problem}")
        # frozen: the one normalisation, so every link is built on the same spelling
        object.__setattr__(self, "api_public_url", self.api_public_url.rstrip("/"))
        if self.api_public_url_configured is None:
            configured = self.api_public_url != DEFAULT_API_PUBLIC_URL
            object.__setattr__(self, "api_public_url_configured", configured)
        self._check_sms()
        if not (math.isfinite(self.ack_link_ttl) and 0 < self.ack_link_ttl <= MAX_ACK_LINK_TTL):
            raise ConfigurationError(
                "OUTBOX_ACK_LINK_TTL must be positive seconds, at most"
                f" {MAX_ACK_LINK_TTL:.0f} (90 days), not {self.ack_link_ttl!r}"
            )
        secret_bytes = len(self.ack_secret.reveal().encode())
        if 0 < secret_bytes < MIN_ACK_SECRET_BYTES:
            raise ConfigurationError(
                f"OUTBOX_ACK_SECRET is {secret_bytes} bytes; at least {MIN_ACK_SECRET_BYTES}"
                ' are required (e.g. python -c "import secrets; print(secrets.token_urlsafe(48))")'
            )

    def _check_sms(self) -> None:
        problem = public_url_problem(self.sms_api_url)
        if problem is not None:
            raise ConfigurationError(f"OUTBOX_SMS_API_URL is refused: {problem}")
        api = urlsplit(self.sms_api_url)
        if api.scheme.lower() == "http" and api.hostname not in ("127.0.0.1", "::1", "localhost"):
            # basic auth carries the auth token: in the clear only on this machine
            raise ConfigurationError(
                "OUTBOX_SMS_API_URL must be https:// (http:// on loopback only)"
            )
        object.__setattr__(self, "sms_api_url", self.sms_api_url.rstrip("/"))
        if self.sms_account_sid and not _TWILIO_ACCOUNT_SID.match(self.sms_account_sid):
            raise ConfigurationError(
                "OUTBOX_SMS_ACCOUNT_SID must be a Twilio account SID: AC and 32 hex digits"
            )
        if self.sms_from and not (
            _E164.match(self.sms_from) or _TWILIO_MESSAGING_SERVICE_SID.match(self.sms_from)
        ):
            raise ConfigurationError(
                "OUTBOX_SMS_FROM must be an E.164 number (+ and 7 to 15 digits) or a"
                f" Messaging Service SID (MG and 32 hex digits), not {self.sms_from!r}"
            )
        if not 1 <= self.sms_max_segments <= MAX_SMS_SEGMENTS:
            raise ConfigurationError(
                f"OUTBOX_SMS_MAX_SEGMENTS must be 1 to {MAX_SMS_SEGMENTS},"
                f" not {self.sms_max_segments}"
            )
        if not (math.isfinite(self.sms_timeout_seconds) and self.sms_timeout_seconds > 0):
            raise ConfigurationError("OUTBOX_SMS_TIMEOUT_SECONDS must be positive")

    @property
    def sms_configured(self) -> bool:
        """Whether the SMS channel has an account, a token and a sender."""
        return bool(self.sms_account_sid and self.sms_auth_token and self.sms_from)

    @property
    def sms_status_callback_url(self) -> str | None:
        """Where Twilio posts delivery reports, or None without a configured public URL."""
        if not self.api_public_url_configured:
            return None
        return f"{self.api_public_url}/api/v1/webhooks/sms"

    @property
    def allowed_senders(self) -> tuple[str, ...]:
        """Addresses allowed in ``From``; the configured sender is always one."""
        return self.smtp_allowed_senders or (self.smtp_from,)

    def ack_signing_key(self) -> bytes | None:
        """The key that signs and verifies acknowledgement links, or None without one.

        HMAC-SHA256 of a fixed label under ``OUTBOX_ACK_SECRET``, else under
        ``OUTBOX_API_JWT_SECRET``: the dispatcher that signs and the API that verifies
        derive the same key from the same settings, and the JWT secret itself never
        signs a link.
        """
        secret = self.ack_secret or self.api_jwt_secret
        if not secret:
            return None
        return hmac.new(secret.reveal().encode(), ACK_KEY_LABEL, hashlib.sha256).digest()

    def ack_url(self, message_id: int, *, now: float | None = None) -> str | None:
        """The link that acknowledges ``message_id``, or None without a signing key.

        ``<public url>/ack/<token>``, valid for ``ack_link_ttl`` seconds from ``now``
        (epoch seconds, the clock by default).
        """
        key = self.ack_signing_key()
        if key is None:
            return None
        token = sign(message_id, key=key, ttl_seconds=self.ack_link_ttl, now=now)
        return f"{self.api_public_url}/ack/{token}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``OUTBOX_*`` variables (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        get = env.get
        tls = (get("OUTBOX_SMTP_TLS") or "none").strip().lower()
        if tls not in ("none", "starttls", "tls"):
            raise ConfigurationError(
                f"OUTBOX_SMTP_TLS must be none, starttls or tls, not {get('OUTBOX_SMTP_TLS')!r}"
            )
        templates_dir = get("OUTBOX_TEMPLATES_DIR")
        hosts = _list(get("OUTBOX_PUSH_ALLOWED_HOSTS"))
        return cls(
            database_url=database_url(get("OUTBOX_DATABASE_URL")),
            smtp_host=get("OUTBOX_SMTP_HOST") or "127.0.0.1",
            smtp_port=_int(env, "OUTBOX_SMTP_PORT", 465 if tls == "tls" else 25, 1),
            smtp_username=get("OUTBOX_SMTP_USERNAME") or None,
            smtp_password=Secret(get("OUTBOX_SMTP_PASSWORD") or ""),
            smtp_from=get("OUTBOX_SMTP_FROM") or "alerts@localhost",
            smtp_tls=tls,  # type: ignore[arg-type]  # validated in __post_init__
            smtp_allowed_senders=_list(get("OUTBOX_SMTP_ALLOWED_SENDERS")),
            smtp_timeout=_float(env, "OUTBOX_SMTP_TIMEOUT", 30.0, 0.1),
            telegram_bot_token=Secret(get("OUTBOX_TELEGRAM_BOT_TOKEN") or ""),
            telegram_api_url=(get("OUTBOX_TELEGRAM_API_URL") or "https://api.telegram.org").rstrip(
                "/"
            ),
            sms_api_url=(get("OUTBOX_SMS_API_URL") or "").strip() or DEFAULT_SMS_API_URL,
            sms_account_sid=(get("OUTBOX_SMS_ACCOUNT_SID") or "").strip(),
            sms_auth_token=Secret(get("OUTBOX_SMS_AUTH_TOKEN") or ""),
            sms_from=(get("OUTBOX_SMS_FROM") or "").strip(),
            sms_max_segments=_int(env, "OUTBOX_SMS_MAX_SEGMENTS", DEFAULT_SMS_MAX_SEGMENTS, 1),
            sms_timeout_seconds=_float(env, "OUTBOX_SMS_TIMEOUT_SECONDS", 10.0, 0.1),
            mailgun_webhook_signing_key=Secret(get("OUTBOX_MAILGUN_WEBHOOK_SIGNING_KEY") or ""),
            vapid_private_key=Secret(get("OUTBOX_VAPID_PRIVATE_KEY") or ""),
            vapid_public_key=get("OUTBOX_VAPID_PUBLIC_KEY") or "",
            vapid_subject=get("OUTBOX_VAPID_SUBJECT") or "mailto:alerts@localhost",
            push_allowed_hosts=hosts or DEFAULT_PUSH_ALLOWED_HOSTS,
            push_timeout=_float(env, "OUTBOX_PUSH_TIMEOUT", 10.0, 0.1),
            push_ttl=_int(env, "OUTBOX_PUSH_TTL", 3600, 0),
            api_jwt_secret=Secret(get("OUTBOX_API_JWT_SECRET") or ""),
            api_jwt_audience=(get("OUTBOX_API_JWT_AUDIENCE") or "").strip() or None,
            api_jwt_issuer=(get("OUTBOX_API_JWT_ISSUER") or "").strip() or None,
            api_auth_failures_per_minute=_int(env, "OUTBOX_API_AUTH_FAILURES_PER_MINUTE", 10, 1),
            templates_dir=Path(templates_dir) if templates_dir else None,
            platform_base_url=(
                get("OUTBOX_PLATFORM_BASE_URL") or "https://platform.example.com"
            ).rstrip("/"),
            # validated and stripped of a trailing slash in __post_init__
            api_public_url=(get("OUTBOX_API_PUBLIC_URL") or "").strip() or DEFAULT_API_PUBLIC_URL,
            api_public_url_configured=bool((get("OUTBOX_API_PUBLIC_URL") or "").strip()),
            ack_secret=Secret(get("OUTBOX_ACK_SECRET") or ""),
            ack_link_ttl=_float(env, "OUTBOX_ACK_LINK_TTL", DEFAULT_ACK_LINK_TTL),
            retry_delays=_delays(get("OUTBOX_RETRY_DELAYS") or "1,2,4,8,16"),
            max_attempts=_int(env, "OUTBOX_MAX_ATTEMPTS", 5, 1),
            lease_seconds=_float(env, "OUTBOX_LEASE_SECONDS", 30.0, 1.0),
            poll_interval=_float(env, "OUTBOX_POLL_INTERVAL", 1.0, 0.01),
            linger=_float(env, "OUTBOX_LINGER_SECONDS", DEFAULT_LINGER_SECONDS, 0.0, 1.0),
            rate_limits=parse_rate_limits(get("OUTBOX_RATE_LIMITS") or DEFAULT_RATE_LIMITS),
            dispatcher_id=get("OUTBOX_DISPATCHER_ID") or None,
            listen=_switch(env, "OUTBOX_LISTEN", True),
            db_timeout=_float(env, "OUTBOX_DB_TIMEOUT", 15.0, 0.1),
            listen_database_url=database_url(
                get("OUTBOX_LISTEN_DATABASE_URL"), "OUTBOX_LISTEN_DATABASE_URL"
            )
            or None,
            prepared_statements=_switch(env, "OUTBOX_PREPARED_STATEMENTS", True),
            fallback_on_failure=cast(
                FallbackOnFailure,  # validated in __post_init__
                (get("OUTBOX_FALLBACK_ON_FAILURE") or "transactional").strip().lower(),
            ),
        )

"""``OUTBOX_*`` variables that point a dispatcher subprocess at the loopback servers.

::

    env = dispatcher_environment(smtp=smtp, telegram=telegram, vapid=keys, twilio=twilio)
    spawn_dispatcher(**env)

The subprocess builds its channels through :mod:`outbox.testing.plugins` (the
production channels, trusting this process's throwaway CA and allowing ``http://``
push endpoints on hosts listed exactly), so TLS stays verified end to end.
"""

from __future__ import annotations

from outbox.testing.push import VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer
from outbox.testing.tls import shared_environment
from outbox.testing.twilio import TwilioServer

PLUGINS = ",".join(
    f"{channel}=outbox.testing.plugins:{channel}_channel"
    for channel in ("email", "telegram", "push", "sms")
)
VAPID_SUBJECT = "mailto:ops@outbox.test"


def dispatcher_environment(
    *,
    smtp: SmtpServer | None = None,
    sender: str = "alerts@outbox.test",
    allowed_senders: tuple[str, ...] = (),
    telegram: TelegramServer | None = None,
    vapid: VapidKeys | None = None,
    push_allowed_hosts: tuple[str, ...] = ("127.0.0.1",),
    twilio: TwilioServer | None = None,
) -> dict[str, str]:
    """Environment for ``outbox dispatch`` delivering to the given servers."""
    env = {
        "OUTBOX_CHANNEL_PLUGINS": PLUGINS,
        **shared_environment(),
        "OUTBOX_SMTP_FROM": sender,
        "OUTBOX_SMTP_ALLOWED_SENDERS": ",".join(allowed_senders or (sender,)),
        "OUTBOX_PUSH_ALLOWED_HOSTS": ",".join(push_allowed_hosts),
    }
    if smtp is not None:
        env |= {
            "OUTBOX_SMTP_HOST": smtp.host,
            "OUTBOX_SMTP_PORT": str(smtp.port),
            "OUTBOX_SMTP_TLS": smtp.tls,
            "OUTBOX_SMTP_TIMEOUT": "5",
        }
        if smtp.username is not None:
            env |= {
                "OUTBOX_SMTP_USERNAME": smtp.username,
                "OUTBOX_SMTP_PASSWORD": smtp.password or "",
            }
    if telegram is not None:
        env |= {
            "OUTBOX_TELEGRAM_BOT_TOKEN": telegram.token,
            "OUTBOX_TELEGRAM_API_URL": telegram.url,
        }
    if twilio is not None:
        env |= twilio.environment()
    if vapid is not None:
        env |= {
            "OUTBOX_VAPID_PRIVATE_KEY": vapid.private_raw,
            "OUTBOX_VAPID_PUBLIC_KEY": vapid.public_raw,
            "OUTBOX_VAPID_SUBJECT": VAPID_SUBJECT,
        }
    return env

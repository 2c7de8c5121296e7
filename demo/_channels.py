"""Channel factories for the demo's dispatchers, through ``OUTBOX_CHANNEL_PLUGINS``.

The demo points its dispatcher subprocesses at these with
``OUTBOX_CHANNEL_PLUGINS=push=outbox.demo._channels:push_channel``. It is the
production :class:`~outbox.dispatcher.channels.push.PushChannel` (and ``SmsChannel``,
``sms=outbox.demo._channels:sms_channel``) with one difference: TLS trusts the
demo's throwaway CA (``OUTBOX_DEMO_CA_FILE``) and nothing else, because the demo's
push service and Twilio stand-in run on ``https://127.0.0.1``. Email and Telegram need no
plugin: the demo's SMTP server speaks plain SMTP and its Bot API plain HTTP on
loopback, which the production channels accept as configured.
"""

from __future__ import annotations

import os
import ssl

import httpx

from outbox._errors import ConfigurationError
from outbox._settings import Settings
from outbox.dispatcher.channels.push import PushChannel
from outbox.dispatcher.channels.sms import SmsChannel

CA_FILE_VARIABLE = "OUTBOX_DEMO_CA_FILE"


def _demo_tls() -> ssl.SSLContext:
    ca_file = os.environ.get(CA_FILE_VARIABLE)
    if not ca_file:
        raise ConfigurationError(f"{CA_FILE_VARIABLE} is not set (only `outbox demo` sets it)")
    return ssl.create_default_context(cafile=ca_file)


def push_channel(settings: Settings) -> PushChannel:
    """The push channel, trusting only the demo's CA."""
    return PushChannel(settings, transport=httpx.AsyncHTTPTransport(verify=_demo_tls()))


def sms_channel(settings: Settings) -> SmsChannel:
    """The SMS channel, trusting only the demo's CA (its Twilio stand-in is ``https``)."""
    return SmsChannel(settings, transport=httpx.AsyncHTTPTransport(verify=_demo_tls()))

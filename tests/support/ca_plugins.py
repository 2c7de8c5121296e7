"""Channel factories for dispatcher subprocesses that trust one CA file.

``OUTBOX_CHANNEL_PLUGINS="push=tests.support.ca_plugins:push_channel"`` (and
``sms=tests.support.ca_plugins:sms_channel``) with
``OUTBOX_TEST_CA_FILE`` naming the PEM of the test process's throwaway CA
(``outbox.testing.tls.loopback_certificate().ca_file``): the production push (SMS)
channel, verifying TLS against that CA and nothing else.
"""

from __future__ import annotations

import os
import ssl

import httpx

from outbox._settings import Settings
from outbox.dispatcher.channels.push import PushChannel
from outbox.dispatcher.channels.sms import SmsChannel


def push_channel(settings: Settings) -> PushChannel:
    context = ssl.create_default_context(cafile=os.environ["OUTBOX_TEST_CA_FILE"])
    return PushChannel(settings, transport=httpx.AsyncHTTPTransport(verify=context))


def sms_channel(settings: Settings) -> SmsChannel:
    context = ssl.create_default_context(cafile=os.environ["OUTBOX_TEST_CA_FILE"])
    return SmsChannel(settings, transport=httpx.AsyncHTTPTransport(verify=context))

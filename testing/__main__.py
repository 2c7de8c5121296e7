"""Run the loopback servers until Ctrl-C: ``python -m outbox.testing``.

SMTP, the Telegram Bot API, Web Push and Twilio (HTTPS with the throwaway CA).
Prints the ``OUTBOX_*`` variables that point a dispatcher at them, then a line for
every message the servers accept.
"""

from __future__ import annotations

import time

from outbox.testing.fixtures import SENDER, TELEGRAM_TOKEN
from outbox.testing.push import PushServer, VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer
from outbox.testing.tls import loopback_certificate
from outbox.testing.twilio import TwilioServer


def main() -> None:
    """Serve until Ctrl-C, printing the environment and what arrives."""
    keys = VapidKeys.generate()
    with (
        SmtpServer() as smtp,
        TelegramServer(token=TELEGRAM_TOKEN) as telegram,
        PushServer() as push,
        TwilioServer(tls=True) as twilio,
    ):
        browser = push.subscribe(application_server_key=keys.public_raw)
        print(f"OUTBOX_SMTP_HOST={smtp.host}")
        print(f"OUTBOX_SMTP_PORT={smtp.port}")
        print(f"OUTBOX_SMTP_FROM={SENDER}")
        print(f"OUTBOX_TELEGRAM_API_URL={telegram.url}")
        print(f"OUTBOX_TELEGRAM_BOT_TOKEN={TELEGRAM_TOKEN}")
        print(f"OUTBOX_VAPID_PRIVATE_KEY={keys.private_raw}")
        print(f"OUTBOX_VAPID_PUBLIC_KEY={keys.public_raw}")
        print(f"OUTBOX_PUSH_ALLOWED_HOSTS={push.host}")
        for name, value in twilio.environment().items():
            print(f"{name}={value}")
        print(
            "OUTBOX_CHANNEL_PLUGINS=push=outbox.testing.plugins:push_channel,"
            "sms=outbox.testing.plugins:sms_channel"
        )
        print(f"OUTBOX_TEST_TLS_DIR={loopback_certificate().directory}")
        print(f"# a push subscription: {browser.info}")
        seen = (0, 0, 0, 0)
        try:
            while True:
                time.sleep(0.5)
                mails, chats, pushes = smtp.messages, telegram.messages, push.messages
                texts = twilio.messages
                for mail in mails[seen[0] :]:
                    print(f"email    {mail.rcpt_tos[0]}: {mail.message['Subject']}")
                for chat in chats[seen[1] :]:
                    print(f"telegram {chat.chat_id}: {chat.plain_text[:70]!r}")
                for received in pushes[seen[2] :]:
                    print(f"push     {received.json().get('title')!r}")
                for text in texts[seen[3] :]:
                    print(f"sms      {text.to}: {text.body[:70]!r}")
                seen = (len(mails), len(chats), len(pushes), len(texts))
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

"""Real protocol servers on loopback for tests and the demo.

* :class:`~outbox.testing.smtp.SmtpServer`: a recording SMTP server (aiosmtpd) with
  scripted per-recipient replies, optional AUTH, STARTTLS or implicit TLS.
* :class:`~outbox.testing.telegram.TelegramServer`: the Bot API ``sendMessage`` subset
  with a MarkdownV2 parser that rejects what Telegram rejects.
* :class:`~outbox.testing.push.PushServer`: a Web Push service that verifies VAPID
  and decrypts ``aes128gcm`` bodies.

Every server binds 127.0.0.1 on a free port, starts with ``start()`` (or ``with``),
stops with ``stop()`` (closing live connections too, to simulate an outage), and can
be started again on the same port. Pytest fixtures live in
:mod:`outbox.testing.fixtures`.
"""

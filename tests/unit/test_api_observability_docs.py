"""The Grafana dashboard and the alert rules use only metric names the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXPORTED = {
    "messages_enqueued_total",
    "messages_sent_total",
    "message_fail_total",
    "message_send_duration_seconds_bucket",
    "position_failure_alerts_sent_total",
    "outbox_queue_depth",
    "outbox_dead_letters",
    "outbox_alerts_awaiting_ack",
    "outbox_oldest_pending_seconds",
    "outbox_metrics_database_up",
    "outbox_api_test_sends_total",
}
NAME = re.compile(r"\b((?:outbox|message|messages|position)_[a-z_]+)\b")


def test_the_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DOCS / "grafana" / "outbox.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]

    used = {name for expr in exprs for name in NAME.findall(expr)}

    assert used and used <= EXPORTED, used - EXPORTED


def test_the_alert_rules_parse_and_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text(encoding="utf-8"))
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]

    used = {name for expr in exprs for name in NAME.findall(expr)}

    assert {"outbox_dead_letters", "outbox_oldest_pending_seconds", "message_fail_total"} <= used
    assert used <= EXPORTED, used - EXPORTED

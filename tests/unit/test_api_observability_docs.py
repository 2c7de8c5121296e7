"""The Grafana dashboard and the alert rules use only metric names the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXPORTED = {
    "messages_enqueued_total",
    "messages_sent_total",
    "message_fail_total",
    "message_send_duration_seconds_bucket",
    "position_failure_alerts_sent_total",
    "outbox_escalations_total",
    "outbox_expired_total",
    "outbox_dispatcher_restarts_total",
    "outbox_queue_depth",
    "outbox_dead_letters",
    "outbox_alerts_awaiting_ack",
    "outbox_oldest_pending_seconds",
    "outbox_metrics_database_up",
    "outbox_api_test_sends_total",
    "outbox_acknowledgements_total",
    "outbox_time_to_acknowledge_seconds_bucket",
}
ALERT_SERIES = {
    "outbox_escalations_total",
    "outbox_expired_total",
    "outbox_acknowledgements_total",
    "outbox_time_to_acknowledge_seconds_bucket",
}
NAME = re.compile(r"\b((?:outbox|message|messages|position)_[a-z_]+)\b")


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (DOCS / "grafana" / "outbox.json").read_text(encoding="utf-8")
    )
    return loaded


def test_the_dashboard_queries_only_exported_metrics() -> None:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]

    used = {name for expr in exprs for name in NAME.findall(expr)}

    assert used and used <= EXPORTED, used - EXPORTED


def test_the_dashboard_shows_escalations_expiries_and_acknowledgements() -> None:
    panels = _dashboard()["panels"]
    by_series = {
        name: [p["title"] for p in panels for t in p["targets"] if name in t["expr"]]
        for name in ALERT_SERIES
    }

    assert all(by_series.values()), by_series
    quantiles = [
        t["expr"]
        for p in panels
        for t in p["targets"]
        if "outbox_time_to_acknowledge_seconds_bucket" in t["expr"]
    ]
    assert {q.split(",", 1)[0] for q in quantiles} == {
        "histogram_quantile(0.5",
        "histogram_quantile(0.9",
    }


def test_the_dashboards_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    cells = [
        (p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy)
        for p in panels
        for dx in range(p["gridPos"]["w"])
        for dy in range(p["gridPos"]["h"])
    ]

    assert len(ids) == len(set(ids))
    assert len(cells) == len(set(cells))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)


def test_the_alert_rules_parse_and_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text(encoding="utf-8"))
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]

    used = {name for expr in exprs for name in NAME.findall(expr)}

    assert {
        "outbox_dead_letters",
        "outbox_oldest_pending_seconds",
        "message_fail_total",
        "outbox_escalations_total",
    } <= used
    assert used <= EXPORTED, used - EXPORTED

"""The in-app inbox: channel inapp and outbox.inbox_item; reading an alert acknowledges it.

Revision ID: outbox_0009
Revises: outbox_0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0009"
down_revision = "outbox_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

"""What a trader can rely on: cancel, expire, collapse, status, acknowledge and escalate, topic preferences.

Revision ID: outbox_0008
Revises: outbox_0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0008"
down_revision = "outbox_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

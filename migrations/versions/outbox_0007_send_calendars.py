"""outbox.rate_limit says what it holds: send calendars and recipient paces, no token buckets.

Revision ID: outbox_0007
Revises: outbox_0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0007"
down_revision = "outbox_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

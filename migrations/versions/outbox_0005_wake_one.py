"""outbox.enqueue wakes one sleeping dispatcher, not all of them.

Revision ID: outbox_0005
Revises: outbox_0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0005"
down_revision = "outbox_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

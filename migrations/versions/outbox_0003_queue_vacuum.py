"""Vacuum the queue table by its dead rows, not by its size.

Revision ID: outbox_0003
Revises: outbox_0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0003"
down_revision = "outbox_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

"""A cheaper enqueue: input rules in the functions, not in CHECK constraints.

Revision ID: outbox_0002
Revises: outbox_0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0002"
down_revision = "outbox_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

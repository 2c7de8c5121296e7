"""outbox.enqueue: one expression and one statement for the common call.

Revision ID: outbox_0013
Revises: outbox_0012
Create Date: 2026-12-05
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0013"
down_revision = "outbox_0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

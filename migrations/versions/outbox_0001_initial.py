"""Initial schema: messages, attempts, recipients, operator views and roles.

Revision ID: outbox_0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0001"
down_revision = None
branch_labels = ("outbox",)
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

"""Idempotency keys belong to the producer (login role) that used them.

Revision ID: outbox_0011
Revises: outbox_0010
Create Date: 2026-12-05
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0011"
down_revision = "outbox_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

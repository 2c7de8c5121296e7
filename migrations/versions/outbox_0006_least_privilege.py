"""Close the holes a producer or an operator could fall through (least privilege).

Revision ID: outbox_0006
Revises: outbox_0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from outbox._migrate import run_sql_file

revision = "outbox_0006"
down_revision = "outbox_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(__file__, "upgrade")


def downgrade() -> None:
    run_sql_file(__file__, "downgrade")

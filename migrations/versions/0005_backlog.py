"""Backlog history: pending rows per job every few minutes, for the web page's 24-hour chart.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from batchjobs.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batchjobs_backlog",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sampled_at", UTCDateTime(), nullable=False),
        sa.Column("job", sa.String(200), nullable=False),
        sa.Column("pending", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batchjobs_backlog"),
    )
    op.create_index("ix_batchjobs_backlog_sampled_at", "batchjobs_backlog", ["sampled_at"])


def downgrade() -> None:
    op.drop_table("batchjobs_backlog")

"""Backfill cursors: resumable one-off backfills.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from batchjobs.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batchjobs_backfills",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("cursor", sa.String(255), nullable=True),
        sa.Column("rows_done", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_batchjobs_backfills"),
    )


def downgrade() -> None:
    op.drop_table("batchjobs_backfills")

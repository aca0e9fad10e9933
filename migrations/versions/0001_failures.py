"""Failure records: attempts, backoff and dead rows per (job, row key).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from batchjobs.store.tables import LongText, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batchjobs_failures",
        sa.Column("job", sa.String(200), nullable=False),
        sa.Column("row_key", sa.String(255), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", UTCDateTime(), nullable=False),
        sa.Column("last_failed_at", UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("dead", sa.Boolean(), nullable=False),
        sa.Column("error_type", sa.String(200), nullable=False),
        sa.Column("error_message", LongText(), nullable=False),
        sa.Column("traceback", LongText(), nullable=False),
        sa.PrimaryKeyConstraint("job", "row_key", name="pk_batchjobs_failures"),
    )


def downgrade() -> None:
    op.drop_table("batchjobs_failures")

"""Crash accounting: how often a row's handler ended its process (or its transaction); workers
in the run history.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batchjobs_failures") as batch:
        batch.add_column(sa.Column("crashes", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("batchjobs_runs") as batch:
        batch.add_column(sa.Column("kind", sa.String(20), nullable=False, server_default="run"))


def downgrade() -> None:
    with op.batch_alter_table("batchjobs_runs") as batch:
        batch.drop_column("kind")
    with op.batch_alter_table("batchjobs_failures") as batch:
        batch.drop_column("crashes")

"""Failure records name the row they were recorded for by a digest of its contents, so that a
new row reusing a deleted row's key never inherits its backoff or dead state.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: records written before this revision have none, and keep applying to their key.
    with op.batch_alter_table("batchjobs_failures") as batch:
        batch.add_column(sa.Column("row_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batchjobs_failures") as batch:
        batch.drop_column("row_digest")

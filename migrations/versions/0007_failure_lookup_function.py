"""Functions the claims of some databases call: on PostgreSQL, one that reads failure records
with a snapshot of its own, so that a claim re-checks its rows' records in the same statement.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

from batchjobs.store import store_class

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in store_class(op.get_context().dialect.name).create_functions_sql():
        op.execute(statement)


def downgrade() -> None:
    for statement in store_class(op.get_context().dialect.name).drop_functions_sql():
        op.execute(statement)

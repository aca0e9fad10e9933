"""Alembic environment for batchjobs' own tables.

batchjobs runs these through `batchjobs migrate` (see batchjobs/migrate.py), which hands over an
open connection. The version table is batchjobs' own, so this history never mixes with the app's.
"""

from alembic import context

from batchjobs.schema import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

"""Alembic environment for batchjobs' own tables.

batchjobs runs these through `batchjobs migrate` (see batchjobs/schema.py), which hands over an
open connection. The version table is batchjobs' own, so this history never mixes with the app's.
"""

from alembic import context

from batchjobs.store import store_class
from batchjobs.store.tables import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=store_class(connection.dialect.name).render_as_batch,
)
with context.begin_transaction():
    context.run_migrations()

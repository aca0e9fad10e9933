"""Helpers for the app's own alembic migrations.

Adding a flag column to a big table is where a poor man's queue bites: every existing row is
suddenly "pending" and the next run emails five million users. ``add_flag_column`` adds the
column so existing rows get the state you choose while new rows default to pending, and builds
the partial pending index without locking the table.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from batchjobs.registry import pending_condition
from batchjobs.store import store_class
from batchjobs.store.base import PENDING_FLAG
from batchjobs.timeutil import utcnow


def add_flag_column(
    op: Any,
    table: str,
    column: str,
    *,
    existing_rows: str,
    type_: Any = None,
    index: bool = True,
    index_name: str | None = None,
    primary_key: str | None = None,
) -> None:
    """Add a flag column to ``table``: pending for new rows, the state you choose for existing ones.

    By default a Boolean flag (NOT NULL, server default false = pending). With ``type_`` a
    DateTime, e.g. ``sa.DateTime(timezone=True)``, a done-at flag: nullable, NULL = pending, and
    existing rows that are done hold the time of the migration (in UTC).

    ``existing_rows`` is ``"done"`` (existing rows are not handled; the usual choice) or
    ``"pending"`` (every existing row is handled by the next runs). With ``index`` (default) the
    partial index :func:`batchjobs.pending_index` declares is created too, under the same name.

    On PostgreSQL adding a column with a constant default rewrites nothing (11+), so this is
    instant on any table size, and the index is built with ``CREATE INDEX CONCURRENTLY`` in an
    autocommit block, so the app keeps writing meanwhile. On MySQL and MariaDB the column is
    added in place too, and the index, on (flag, primary key), is built online. On SQLite
    existing rows are updated in place. ``primary_key`` names the key column for the index; it
    is looked up when not given, which needs a live connection (pass it for alembic's offline
    ``--sql`` mode).
    """
    if existing_rows not in ("done", "pending"):
        raise ValueError(f"existing_rows must be 'done' or 'pending', not {existing_rows!r}")
    flag_type = sa.Boolean() if type_ is None else sa.types.to_instance(type_)
    if not isinstance(flag_type, (sa.Boolean, sa.DateTime)):
        raise ValueError(f"a flag is Boolean or DateTime, not {flag_type}")
    done_at = None
    if isinstance(flag_type, sa.DateTime):
        # Whole seconds: every database's plain DATETIME takes them as a default.
        now = utcnow().replace(microsecond=0)
        done_at = now if flag_type.timezone else now.replace(tzinfo=None)
    bind = op.get_bind()
    store = store_class(bind.dialect.name)
    store.add_flag_column(op, table, column, existing_done=existing_rows == "done", done_at=done_at, type_=flag_type)
    if not index:
        return
    if primary_key is None:
        if op.get_context().as_sql:
            raise ValueError("in offline (--sql) mode pass primary_key='id' (the table cannot be inspected)")
        found = sa.inspect(bind).get_pk_constraint(table)["constrained_columns"]
        if len(found) != 1:
            raise ValueError(f"{table} needs a single-column primary key for a pending index, has {found}")
        primary_key = found[0]
    # Same expression as pending_index(), so the claim query matches the index.
    pending = pending_condition(sa.Column(column, flag_type, nullable=done_at is not None))
    store.create_pending_index(op, index_name or f"ix_{table}_{column}_pending", table, primary_key, pending)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """For ``context.configure(include_name=...)`` in the app's alembic ``env.py``.

    batchjobs' own tables live in the app's database but not in its models, so autogenerate
    would otherwise propose dropping them. This hides them (and batchjobs' version table).
    """
    return not (type_ == "table" and name is not None and name.startswith("batchjobs_"))


def add_pending_trigger(op: Any, table: str, column: str, *, boolean: bool = True) -> None:
    """Install the trigger that wakes `batchjobs worker` when a row of ``table`` becomes pending.

    ``column`` is the job's flag; ``boolean`` says whether it is a Boolean flag (False = pending)
    or a nullable DateTime (NULL = pending). On databases without notifications this does
    nothing: workers poll them.
    """
    for statement in store_class(op.get_context().dialect.name).pending_trigger_sql(table, column, boolean=boolean):
        op.execute(statement)


def drop_pending_trigger(op: Any, table: str, column: str) -> None:
    """Remove what :func:`add_pending_trigger` installed (for the migration's downgrade)."""
    for statement in store_class(op.get_context().dialect.name).drop_pending_trigger_sql(table, column):
        op.execute(statement)


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """For ``context.configure(include_object=...)`` in the app's alembic ``env.py``.

    MySQL and MariaDB have no partial indexes, so there a pending index is on (flag, primary
    key) while the models declare it on the key (see :func:`batchjobs.pending_index`). This
    keeps autogenerate from proposing to rebuild it; on other databases it changes nothing.
    """
    if type_ == "index" and not reflected and compare_to is not None:
        flag = obj.info.get(PENDING_FLAG)
        built = [column.name for column in compare_to.columns]
        if flag is not None and built == [flag, *(column.name for column in obj.columns)]:
            return False
    return True

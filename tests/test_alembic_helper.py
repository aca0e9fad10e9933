"""batchjobs.alembic.add_flag_column in a real alembic migration of an app."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text

from batchjobs.db import create_engine

ENV = '''
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''

MIGRATION = '''
"""add welcome_email_sent"""
from alembic import op

from batchjobs.alembic import add_flag_column

revision = "a1"
down_revision = None


def upgrade():
    add_flag_column(op, "users", "welcome_email_sent", existing_rows={existing!r})
'''


def _app_migrations(tmp_path: Path, url: str, existing: str) -> Config:
    scripts = tmp_path / "app_migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(ENV)
    (scripts / "script.py.mako").write_text("")
    (scripts / "versions" / "a1_add_flag.py").write_text(MIGRATION.format(existing=existing))
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@pytest.mark.parametrize("existing", ["done", "pending"])
def test_add_flag_column_on_a_table_with_rows(db_url: str, tmp_path: Path, existing: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(100))"))
        conn.execute(text("INSERT INTO users (id, email) VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x')"))

    command.upgrade(_app_migrations(tmp_path, engine.url.render_as_string(hide_password=False), existing), "head")

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, email) VALUES (4, 'new@x')"))
        flags = dict(conn.execute(text("SELECT id, welcome_email_sent FROM users ORDER BY id")).all())
    old_state = existing == "done"
    assert {k: bool(v) for k, v in flags.items()} == {1: old_state, 2: old_state, 3: old_state, 4: False}
    [index] = [i for i in inspect(engine).get_indexes("users") if i["name"] == "ix_users_welcome_email_sent_pending"]
    if engine.dialect.name in ("mysql", "mariadb"):
        # No partial indexes: the flag leads, and the pending rows' entries are in key order.
        assert index["column_names"] == ["welcome_email_sent", "id"]
        engine.dispose()
        return
    assert index["column_names"] == ["id"]
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            ddl = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_users_welcome_email_sent_pending'")).scalar()
            assert ddl.endswith("WHERE (welcome_email_sent = false)")
        else:
            ddl = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_users_welcome_email_sent_pending'")).scalar()
            assert ddl.endswith("WHERE welcome_email_sent = 0")
    engine.dispose()


def test_autogenerate_leaves_batchjobs_tables_alone(db_url: str) -> None:
    import jobapp
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from batchjobs.alembic import include_name, include_object
    from batchjobs.schema import migrate

    engine = create_engine(db_url)
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    with engine.connect() as conn:
        unfiltered = compare_metadata(MigrationContext.configure(conn), jobapp.Base.metadata)
        opts = {"include_name": include_name, "include_object": include_object}
        filtered = compare_metadata(MigrationContext.configure(conn, opts=opts), jobapp.Base.metadata)
    engine.dispose()
    dropped = {diff[1].name for diff in unfiltered if diff[0] == "remove_table"}
    assert {"batchjobs_failures", "batchjobs_alembic_version"} <= dropped
    assert filtered == []


DATETIME_MIGRATION = '''
"""add receipt_sent_at"""
import sqlalchemy as sa
from alembic import op

from batchjobs.alembic import add_flag_column

revision = "a1"
down_revision = None


def upgrade():
    add_flag_column(op, "orders", "receipt_sent_at", type_=sa.DateTime(timezone={timezone!r}), existing_rows={existing!r})
'''


def _file_of_orders(conn: Any) -> Any:
    """PostgreSQL: the file holding the table; rewriting the table gives it a new one."""
    return conn.execute(text("SELECT relfilenode FROM pg_class WHERE relname = 'orders'")).scalar()


@pytest.mark.parametrize("timezone", [True, False])
@pytest.mark.parametrize("existing", ["done", "pending"])
def test_add_a_datetime_flag_on_a_table_with_rows(db_url: str, tmp_path: Path, existing: str, timezone: bool) -> None:
    engine = create_engine(db_url)
    postgresql = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)"))
        conn.execute(text("INSERT INTO orders (id, total) VALUES (1, 10), (2, 20), (3, 30)"))
        file_before = _file_of_orders(conn) if postgresql else None
    config = _app_migrations(tmp_path, engine.url.render_as_string(hide_password=False), existing)
    (Path(config.get_main_option("script_location")) / "versions" / "a1_add_flag.py").write_text(
        DATETIME_MIGRATION.format(existing=existing, timezone=timezone)
    )
    before = datetime.now(dt_timezone.utc).replace(microsecond=0, tzinfo=None)
    command.upgrade(config, "head")

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO orders (id, total) VALUES (4, 40)"))
        sent = dict(conn.execute(text("SELECT id, receipt_sent_at FROM orders ORDER BY id")).all())
        if postgresql:
            # Done rows read the default the column was added with: no row was rewritten.
            assert _file_of_orders(conn) == file_before
    assert sent[4] is None  # a new row is pending
    if existing == "pending":
        assert set(sent.values()) == {None}
    else:
        # Existing rows are done, at the time of the migration (UTC).
        times = {value if isinstance(value, datetime) else datetime.fromisoformat(value) for k, value in sent.items() if k != 4}
        [done_at] = times
        assert abs(done_at.replace(tzinfo=None) - before if done_at.tzinfo is None else done_at - before.replace(tzinfo=dt_timezone.utc)) < timedelta(minutes=1)
    [index] = [i for i in inspect(engine).get_indexes("orders") if i["name"] == "ix_orders_receipt_sent_at_pending"]
    expected = ["receipt_sent_at", "id"] if engine.dialect.name in ("mysql", "mariadb") else ["id"]
    assert index["column_names"] == expected
    engine.dispose()

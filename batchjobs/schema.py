"""Apply batchjobs' own alembic migrations (shipped inside the package as ``batchjobs.migrations``)."""

from __future__ import annotations

from importlib.resources import files

from sqlalchemy import Engine

from batchjobs.db import connect, schema_revision


def migrate(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade batchjobs' tables to ``revision``; returns (revision before, revision after).

    It never touches the app's own tables or its ``alembic_version`` table.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("batchjobs.migrations")))
    with connect(engine) as connection:
        before = schema_revision(connection)
        connection.commit()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.commit()
        return before, schema_revision(connection)

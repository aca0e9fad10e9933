"""batchjobs' own migrations: their own version table, idempotent, the app's history untouched."""

from __future__ import annotations

from conftest import cli_env, run_cli
from sqlalchemy import inspect, text

from batchjobs.db import create_engine
from batchjobs.schema import migrate
from batchjobs.store.tables import SCHEMA_REVISION, VERSION_TABLE, metadata


def test_migrate_creates_tables_beside_the_apps_own_alembic_history(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('app_rev_42')"))

    first = run_cli("--database-url", db_url, "migrate")
    second = run_cli("migrate", env=cli_env(BATCHJOBS_DATABASE_URL=db_url))

    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"batchjobs tables upgraded from revision (none) to {SCHEMA_REVISION}"
    assert second.stdout.strip() == f"batchjobs tables are up to date (revision {SCHEMA_REVISION})"
    tables = set(inspect(engine).get_table_names())
    assert {VERSION_TABLE, *metadata.tables} <= tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "app_rev_42"
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == SCHEMA_REVISION
    engine.dispose()


def test_schema_revision_constant_matches_the_migration_head() -> None:
    from importlib.resources import files

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(files("batchjobs.migrations")))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    """No drift between schema.py and the migrations."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(db_url)
    migrate(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        diff = [d for d in compare_metadata(context, metadata) if not (d[0] == "remove_table")]
    engine.dispose()
    assert diff == []


def test_the_public_migrate_is_the_function_once_its_module_is_imported() -> None:
    # conftest imported batchjobs.schema already; a module of the same name as the function
    # would have taken the function's place in the package.
    import batchjobs.schema  # noqa: F401
    from batchjobs import migrate as public

    assert callable(public) and public is migrate


def test_migration_0007_creates_and_drops_the_claims_failure_function(db_url: str) -> None:
    """PostgreSQL's claims read failure records through a function of migration 0007; elsewhere
    the migration does nothing. Down and up again leave the schema as it was."""
    from importlib.resources import files

    from alembic import command
    from alembic.config import Config

    engine = create_engine(db_url)
    migrate(engine)

    on_postgresql = engine.dialect.name == "postgresql"

    def function_exists() -> bool:
        if not on_postgresql:
            return False  # nothing to look for: the migration creates nothing there
        with engine.connect() as conn:
            found = conn.execute(text("SELECT to_regprocedure('batchjobs_failures_now(varchar, varchar[])')")).scalar()
        return found is not None

    config = Config()
    config.set_main_option("script_location", str(files("batchjobs.migrations")))
    assert function_exists() is on_postgresql
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0006")
        conn.commit()
    assert function_exists() is False
    migrate(engine)
    assert function_exists() is on_postgresql
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == SCHEMA_REVISION
    engine.dispose()

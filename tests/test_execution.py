"""Every statement batchjobs sends goes through SQLAlchemy's public execution API: column types
convert every value, errors are raised as SQLAlchemy raises them, listeners (tracing tools) see
every statement, and whoever watches changes nothing about what runs."""

from __future__ import annotations

import enum
import traceback
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from conftest import cli_env, run_cli, url_of
from sqlalchemy import DateTime, Engine, Enum, Numeric, String, TypeDecorator, Uuid, event, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from test_cli import assert_one_line_error
from test_run_pending import add_items, processed

from batchjobs import Registry, flag_column, run_pending
from batchjobs.db import create_engine
from batchjobs.schema import migrate
from batchjobs.store.tables import Failure


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Shouted(TypeDecorator[str]):
    """Stored in lower case, read in upper case: shows that both conversions ran."""

    impl = String(50)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value.lower()

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value.upper()


class Base(DeclarativeBase):
    pass


class Parcel(Base):
    __tablename__ = "parcels"

    # Stored as 32 hex digits: every key bound or read goes through the column type's conversion.
    id: Mapped[uuid.UUID] = mapped_column(Uuid(native_uuid=False), primary_key=True)
    label: Mapped[str] = mapped_column(Shouted())
    color: Mapped[Color] = mapped_column(Enum(Color))
    weight: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    shipped: Mapped[bool] = flag_column()
    # A column name SQLAlchemy has to escape in a bound parameter's name.
    shipped_at: Mapped[datetime | None] = mapped_column("shipped.at", DateTime(timezone=True))


@pytest.fixture
def parcels(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url)
    Base.metadata.create_all(engine)
    migrate(engine)
    with Session(engine) as session, session.begin():
        session.add_all(
            Parcel(id=uuid.uuid4(), label=f"Parcel {i}", color=Color.RED if i % 2 else Color.GREEN, weight=Decimal(f"{i}.25"))
            for i in range(7)
        )
    yield engine
    engine.dispose()


def registry_for(seen: list[Any]) -> Registry:
    registry = Registry()

    # Chunks of 3: the keyset walk binds a hex-stored UUID after every chunk.
    @registry.flag_job(Parcel.shipped, done_at=Parcel.shipped_at, columns=[Parcel.label, Parcel.color, Parcel.weight], batch_size=3)
    def ship(parcel: Any) -> None:
        seen.append(parcel)
        if parcel.label == "PARCEL 4":
            raise ValueError("address unknown")

    return registry


@pytest.mark.parametrize("observed", [False, True], ids=["unobserved", "listener-on-engine"])
def test_plain_rows_keys_and_failures_are_the_same_either_way(parcels: Engine, observed: bool) -> None:
    claims: list[str] = []
    if observed:
        @event.listens_for(parcels, "before_cursor_execute")
        def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if "FOR NO KEY UPDATE" in statement:
                claims.append(statement)

    seen: list[Any] = []
    summary = run_pending(registry_for(seen), parcels)

    assert (summary.done, summary.failed) == (6, 1)
    # Every value went through its column type, as SQLAlchemy hands it out.
    assert sorted(row.label for row in seen) == [f"PARCEL {i}" for i in range(7)]
    assert {type(row.id) for row in seen} == {uuid.UUID}
    assert {row.label: (row.color, row.weight) for row in seen}["PARCEL 3"] == (Color.RED, Decimal("3.25"))
    # Key order is the stored hex order, across chunks.
    assert [row.id for row in seen] == sorted((row.id for row in seen), key=lambda key: key.hex)
    with Session(parcels) as session:
        pending = session.execute(select(Parcel.label, Parcel.shipped_at).where(Parcel.shipped.is_(False))).all()
        shipped_at = session.scalars(select(Parcel.shipped_at).where(Parcel.shipped.is_(True))).all()
        [failure] = session.scalars(select(Failure)).all()
    assert pending == [("PARCEL 4", None)]
    assert len(shipped_at) == 6 and None not in shipped_at
    assert failure.row_key == next(row.id for row in seen if row.label == "PARCEL 4").hex
    # A listener on the engine sees the run's claims: they went through SQLAlchemy.
    assert len(claims) == (4 if observed else 0)


def test_a_tracing_listener_sees_every_claim_and_mark_and_changes_nothing(engine: Engine) -> None:
    """Run twice on the same backlog, unwatched and watched by a global listener (as OpenTelemetry's
    SQLAlchemy instrumentation listens): the same outcome, and the watched run's statements are the
    whole story (a claim and a mark per chunk, no side path)."""
    seen: list[str] = []

    def trace(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    for watched in (False, True):
        add_items(engine, 25)
        if watched:
            event.listen(Engine, "before_cursor_execute", trace)
        try:
            summary = run_pending(registry_of_items(), engine, batch_size=10, record=False)
        finally:
            if watched:
                event.remove(Engine, "before_cursor_execute", trace)
        assert (summary.done, summary.failed) == (25, 0)
        assert all(processed(engine).values())
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM items"))
    # A claim is a SELECT, or on PostgreSQL a WITH query that selects and locks (see with_states).
    claims = [s for s in seen if s.split()[0] in ("SELECT", "WITH") and "AS batchjobs_row_key" in s]
    marks = [s for s in seen if s.startswith("UPDATE items")]
    # Chunks of 10, 10 and 5; the short chunk ends the walk, and a last claim finds nothing.
    assert (len(claims), len(marks)) == (4, 3)


def test_an_engine_with_its_own_creator_and_listeners_is_used_as_it_is(db_url: str) -> None:
    """The app's creator (and so its connect arguments) makes every connection a run and its
    worker threads use; on PostgreSQL and MySQL its engine listeners see their statements."""
    import sqlite3

    import sqlalchemy

    from batchjobs import run_concurrently
    from batchjobs.db import parse_url

    url = parse_url(db_url)
    made: list[object] = []
    if url.get_backend_name() == "sqlite":

        def creator() -> Any:
            made.append(url.database)
            return sqlite3.connect(str(url.database), check_same_thread=False)

    elif url.get_backend_name() == "postgresql":

        def creator() -> Any:
            made.append(url.database)
            return psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))

    else:
        import pymysql

        def creator() -> Any:
            made.append(url.database)
            return pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, password=url.password or "", database=url.database)

    app_engine = sqlalchemy.create_engine(url.set(query={}), creator=creator, pool_size=5)
    setup = create_engine(db_url)
    import jobapp

    jobapp.Base.metadata.create_all(setup)
    migrate(setup)
    setup.dispose()
    seen: list[str] = []

    @event.listens_for(app_engine, "before_cursor_execute")
    def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    add_items(app_engine, 40)
    made.clear()
    summary = run_concurrently(registry_of_items(), app_engine, concurrency=2, pool="thread", batch_size=5)
    assert summary.done == 40 and all(processed(app_engine).values())
    assert made, "the run's connections came from the app's creator"
    if url.get_backend_name() != "sqlite":
        assert any("SKIP LOCKED" in statement for statement in seen)
    app_engine.dispose()


def registry_of_items() -> Registry:
    import jobapp

    registry = Registry()

    @registry.flag_job(jobapp.Item.processed)
    def handle(item: Any) -> None:
        pass

    return registry


RAISE_ON_SHIP = """
    CREATE FUNCTION refuse_shipping() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'shipping is closed'; END $$;
    CREATE TRIGGER refuse_shipping BEFORE UPDATE OF shipped ON parcels
    FOR EACH ROW EXECUTE FUNCTION refuse_shipping();
"""


def test_a_database_error_is_raised_as_sqlalchemy_raises_it_and_the_chunk_rolls_back(parcels: Engine) -> None:
    with parcels.begin() as connection:
        connection.execute(text(RAISE_ON_SHIP))
    seen: list[Any] = []

    with pytest.raises(DBAPIError) as caught:
        run_pending(registry_for(seen), parcels)

    assert isinstance(caught.value.orig, psycopg.errors.RaiseException)
    assert "shipping is closed" in str(caught.value)
    # The mark-done UPDATE failed, sent by the store through SQLAlchemy's Connection.execute.
    frames = [(frame.filename, frame.name) for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert any(name.endswith("batchjobs/store/base.py") and function == "mark_done" for name, function in frames)
    assert any(name.endswith("sqlalchemy/engine/base.py") and function == "execute" for name, function in frames)
    with Session(parcels) as session:
        assert session.scalar(select(Parcel.id).where(Parcel.shipped.is_(True))) is None
        assert session.scalars(select(Failure)).all() == []
    with parcels.begin() as connection:
        connection.execute(text("DROP TRIGGER refuse_shipping ON parcels"))
    # The pool's connection came back usable: the next run ships everything.
    assert run_pending(registry_for(seen), parcels).done == 6


def test_cli_reports_the_database_error_in_one_line(pg_engine: Engine) -> None:
    add_items(pg_engine, 5)
    with pg_engine.begin() as connection:
        connection.execute(text(RAISE_ON_SHIP.replace("shipped ON parcels", "processed ON items")))

    result = run_cli("-A", "jobapp:jobs", "run-pending", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine)))

    assert_one_line_error(result, "database error", "shipping is closed")
    assert set(processed(pg_engine).values()) == {False}


def test_a_job_whose_where_expands_a_list_still_runs(parcels: Engine) -> None:
    registry = Registry()
    seen: list[Any] = []

    # An expanding IN makes the claim's SQL depend on its values: it goes through SQLAlchemy.
    @registry.flag_job(Parcel.shipped, where=Parcel.color.in_([Color.RED]), columns=[Parcel.label], batch_size=2)
    def ship_red(parcel: Any) -> None:
        seen.append(parcel.label)

    assert run_pending(registry, parcels).done == 3
    assert sorted(seen) == ["PARCEL 1", "PARCEL 3", "PARCEL 5"]


def test_the_database_going_away_mid_chunk_invalidates_the_connection_and_loses_nothing(pg_url: str) -> None:
    engine = create_engine(pg_url, connect_args={"application_name": "parcel-run"})
    Base.metadata.create_all(engine)
    migrate(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Parcel(id=uuid.uuid4(), label=f"p{i}", color=Color.RED, weight=Decimal(1)) for i in range(5))
    admin = create_engine(pg_url)
    registry = Registry()
    killed: list[str] = []

    @registry.flag_job(Parcel.shipped, columns=[Parcel.label])
    def ship(parcel: Any) -> None:
        if parcel.label == "P2" and not killed:
            killed.append(parcel.label)
            # The run's chunk is the one connection idle in a transaction; wait until it is gone.
            with admin.connect() as connection:
                connection.execute(text(
                    "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                    " WHERE application_name = 'parcel-run' AND state = 'idle in transaction'"
                ))

    try:
        with pytest.raises(DBAPIError) as caught:
            run_pending(registry, engine)
        # The mark-done UPDATE found the connection gone: raised and invalidated as SQLAlchemy does.
        assert caught.value.connection_invalidated
        assert isinstance(caught.value.orig, psycopg.OperationalError)
        with Session(admin) as session:
            assert session.scalar(select(func.count()).where(Parcel.shipped.is_(True))) == 0
        assert run_pending(registry, engine).done == 5
    finally:
        admin.dispose()
        engine.dispose()


class Letter(Base):
    """An app table with a Python-side onupdate column, as many have for updated_at."""

    __tablename__ = "letters"

    id: Mapped[int] = mapped_column(primary_key=True)
    posted: Mapped[bool] = flag_column()
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), onupdate=lambda: datetime.now(timezone.utc))


def test_marking_done_sets_onupdate_columns_as_sqlalchemy_does(pg_url: str) -> None:
    engine = create_engine(pg_url)
    Base.metadata.create_all(engine)
    migrate(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Letter(id=i) for i in range(3))
    registry = Registry()

    @registry.flag_job(Letter.posted, columns=[Letter.id])
    def post(letter: Any) -> None:
        pass

    try:
        assert run_pending(registry, engine).done == 3
        with Session(engine) as session:
            assert session.execute(select(Letter.posted, Letter.updated_at.is_not(None))).all() == [(True, True)] * 3
    finally:
        engine.dispose()

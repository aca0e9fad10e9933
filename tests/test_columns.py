"""``columns=``: handlers get plain read-only rows of chosen columns instead of ORM objects."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, LargeBinary, String, Uuid, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from batchjobs import BatchJobsError, JobContext, Registry, flag_column, pending_index, run_pending
from batchjobs.db import create_engine
from batchjobs.schema import migrate
from batchjobs.store.tables import Failure


class Base(DeclarativeBase):
    pass


class Signup(Base):
    __tablename__ = "signups"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The attribute name differs from the column name: plain rows use the attribute name.
    email: Mapped[str] = mapped_column("email_address", String(100))
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary)
    sent_to: Mapped[str | None] = mapped_column(String(100))
    welcomed: Mapped[bool] = flag_column()


class Scan(Base):
    __tablename__ = "scans"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    done: Mapped[bool] = flag_column()


pending_index(Signup.welcomed)


@pytest.fixture
def app_engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    Base.metadata.create_all(engine)
    migrate(engine)
    yield engine
    engine.dispose()


def add_signups(engine: Engine, count: int) -> None:
    with Session(engine) as session, session.begin():
        rows = [{"id": i, "email": f"user{i}@example.com", "avatar": b"\x00" * 1000} for i in range(1, count + 1)]
        session.execute(insert(Signup), rows)


def test_handler_gets_named_rows_of_the_chosen_columns(app_engine: Engine) -> None:
    add_signups(app_engine, 150)
    registry = Registry()
    seen: list[Any] = []

    @registry.flag_job(Signup.welcomed, columns=[Signup.email], batch_size=40)
    def welcome(signup: Any) -> None:
        seen.append(signup)

    summary = run_pending(registry, app_engine)

    assert summary.done == 150
    # The primary key comes first even when not asked for; nothing else is loaded.
    assert seen[0]._fields == ("id", "email")
    assert [(row.id, row.email) for row in seen] == [(i, f"user{i}@example.com") for i in range(1, 151)]
    with pytest.raises(AttributeError):
        seen[0].email = "changed"  # type: ignore[misc]
    with Session(app_engine) as session:
        assert session.scalars(select(Signup).where(Signup.welcomed.is_(False))).all() == []


def test_writes_through_ctx_session_commit_with_the_chunk_and_fail_alone(app_engine: Engine) -> None:
    add_signups(app_engine, 10)
    registry = Registry()

    @registry.flag_job(Signup.welcomed, columns=[Signup.id, Signup.email])
    def welcome(signup: Any, ctx: JobContext) -> None:
        ctx.session.execute(update(Signup).where(Signup.id == signup.id).values(sent_to=signup.email))
        if signup.id == 4:
            raise ValueError("mail server said no")

    summary = run_pending(registry, app_engine)

    assert (summary.done, summary.failed) == (9, 1)
    with Session(app_engine) as session:
        rows = {row.id: (row.sent_to, row.welcomed) for row in session.scalars(select(Signup))}
        [key] = session.scalars(select(Failure.row_key).where(Failure.job == "welcome")).all()
    # Row 4's write was rolled back with its savepoint; the others committed with their flags.
    assert rows[4] == (None, False) and key == "4"
    assert all(rows[i] == (f"user{i}@example.com", True) for i in rows if i != 4)


def test_batch_handler_gets_a_list_of_plain_rows(app_engine: Engine) -> None:
    add_signups(app_engine, 25)
    registry = Registry()
    batches: list[list[int]] = []

    @registry.flag_job(Signup.welcomed, columns=[Signup.email], batch=True, batch_size=10)
    def welcome(signups: list[Any]) -> None:
        batches.append([row.id for row in signups])

    assert run_pending(registry, app_engine).done == 25
    assert batches == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]


def test_uuid_keys_with_plain_rows(app_engine: Engine) -> None:
    # Version 4 UUIDs whose first groups rise as their last groups fall: MariaDB's native UUID
    # type orders them by their last group first, the other way round from Python.
    keys = [uuid.UUID(f"{i}0000000-0000-4000-8000-00000000000{6 - i}") for i in range(1, 6)]
    bad = keys[2]
    with Session(app_engine) as session, session.begin():
        session.add_all([Scan(id=key) for key in keys])
    registry = Registry()
    seen: list[uuid.UUID] = []

    # Chunks of 2: the walk continues after UUID keys, compared as the database orders them.
    @registry.flag_job(Scan.done, columns=[Scan.id], batch_size=2)
    def scan(row: Any) -> None:
        assert isinstance(row.id, uuid.UUID)
        seen.append(row.id)
        if row.id == bad:
            raise ValueError("infected")

    summary = run_pending(registry, app_engine)

    assert (summary.done, summary.failed) == (4, 1)
    with Session(app_engine) as session:
        # Each row once, in the database's order of its keys (MariaDB's native UUID type orders
        # them by their last group first, unlike Python).
        assert seen == session.scalars(select(Scan.id).order_by(Scan.id)).all()
        assert session.scalars(select(Scan.id).where(Scan.done.is_(False))).all() == [bad]


def test_handlers_without_a_session_still_time_out_and_fail_alone(app_engine: Engine) -> None:
    """Plain-row handlers that take no ctx run on a bare connection: timeouts and failures are
    recorded as with a session, and the chunk's other rows commit."""
    import time

    add_signups(app_engine, 5)
    registry = Registry()

    @registry.flag_job(Signup.welcomed, columns=[Signup.email], timeout=0.2)
    def welcome(signup: Any) -> None:
        if signup.id == 2:
            time.sleep(30)
        if signup.id == 4:
            raise ValueError("mail server said no")

    summary = run_pending(registry, app_engine)

    assert (summary.done, summary.failed) == (3, 2)
    with Session(app_engine) as session:
        errors = dict(session.execute(select(Failure.row_key, Failure.error_type).where(Failure.job == "welcome")).all())
        pending = session.scalars(select(Signup.id).where(Signup.welcomed.is_(False)).order_by(Signup.id)).all()
    assert errors == {"2": "batchjobs.JobTimeout", "4": "ValueError"}
    assert pending == [2, 4]


def test_columns_of_another_table_are_refused() -> None:
    with pytest.raises(BatchJobsError, match="columns= may only name columns of signups, not scans.id"):
        Registry().flag_job(Signup.welcomed, columns=[Scan.id])

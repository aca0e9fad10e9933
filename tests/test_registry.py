"""Job definitions: names, validation, and the helpers for app models."""

from __future__ import annotations

import jobapp
import pytest
from sqlalchemy import Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateIndex

from batchjobs import BatchJobsError, Registry, flag_column, pending_index
from batchjobs.registry import load_registry


class Base(DeclarativeBase):
    pass


class Pair(Base):
    __tablename__ = "pairs"
    a: Mapped[int] = mapped_column(Integer, primary_key=True)
    b: Mapped[int] = mapped_column(Integer, primary_key=True)
    done: Mapped[bool] = flag_column()


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(10))


def test_job_name_defaults_to_function_name_and_must_be_unique() -> None:
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed)
    def handle(item: jobapp.Item) -> None: ...

    assert list(registry.jobs) == ["handle"]
    with pytest.raises(BatchJobsError, match="already registered"):
        registry.flag_job(jobapp.Item.processed)(handle)
    registry.flag_job(jobapp.Item.processed, name="handle_again")(handle)
    assert list(registry.jobs) == ["handle", "handle_again"]


def test_composite_primary_key_is_refused() -> None:
    with pytest.raises(BatchJobsError, match=r"composite primary key \(a, b\)"):
        Registry().flag_job(Pair.done)


def test_flag_must_be_boolean_or_datetime() -> None:
    with pytest.raises(BatchJobsError, match="must be Boolean"):
        Registry().flag_job(Note.status)


def test_context_argument_is_optional() -> None:
    registry = Registry()
    registry.flag_job(jobapp.Item.processed, name="one")(lambda item: None)
    registry.flag_job(jobapp.Item.processed, name="two")(lambda item, ctx: None)
    assert not registry.job("one").wants_context and registry.job("two").wants_context


def test_flag_column_defaults_to_pending_on_the_server() -> None:
    column = jobapp.Item.__table__.c.processed
    assert column.nullable is False
    assert str(column.server_default.arg) == "false"


def test_pending_index_is_partial_on_the_primary_key() -> None:
    index = next(i for i in jobapp.Item.__table__.indexes if i.name == "ix_items_processed_pending")
    ddl_pg = str(CreateIndex(index).compile(dialect=create_engine("postgresql+psycopg://").dialect))
    ddl_sqlite = str(CreateIndex(index).compile(dialect=create_engine("sqlite://").dialect))
    assert ddl_pg.strip() == "CREATE INDEX ix_items_processed_pending ON items (id) WHERE processed = false"
    assert ddl_sqlite.strip() == "CREATE INDEX ix_items_processed_pending ON items (id) WHERE processed = 0"
    with pytest.raises(BatchJobsError, match="must be Boolean"):
        pending_index(Note.status)


def test_select_by_job_and_queue() -> None:
    names = lambda jobs: [j.name for j in jobs]  # noqa: E731
    assert names(jobapp.jobs.select()) == ["process_item", "send_receipt", "make_thumbnails"]
    assert names(jobapp.jobs.select(queues=["mail"])) == ["send_receipt"]
    assert names(jobapp.jobs.select(jobs=["make_thumbnails"], queues=["mail"])) == ["make_thumbnails", "send_receipt"]


def test_load_registry_finds_the_only_registry() -> None:
    assert load_registry("jobapp") is jobapp.jobs
    assert load_registry("jobapp:jobs") is jobapp.jobs
    with pytest.raises(BatchJobsError, match="no attribute 'nope'"):
        load_registry("jobapp:nope")

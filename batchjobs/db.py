"""Database URLs, engines, connections, and the checks that turn driver errors into one clear line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from batchjobs.errors import BatchJobsError, SchemaOutOfDate
from batchjobs.store import configured, driver_for, driver_install, store_class, store_for
from batchjobs.store.tables import SCHEMA_REVISION


def resolve_database_url(explicit: str | None = None, registry_url: str | None = None) -> str:
    """The URL to use: ``explicit``, then $BATCHJOBS_DATABASE_URL, $DATABASE_URL, the registry's."""
    url = explicit or os.environ.get("BATCHJOBS_DATABASE_URL") or os.environ.get("DATABASE_URL") or registry_url
    if not url:
        raise BatchJobsError(
            "no database URL: pass --database-url, set BATCHJOBS_DATABASE_URL or DATABASE_URL, "
            "or give Registry(database_url=...)"
        )
    return url


def parse_url(url: str | URL) -> URL:
    """Parse a URL of a supported database; one that names no driver (``postgresql://``) gets the
    driver batchjobs ships with."""
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - a non-numeric port only fails when read
    except (ArgumentError, ValueError):
        raise BatchJobsError(f"not a valid database URL: {mask_url(str(url))!r}") from None
    if parsed.host and "@" in parsed.host:
        raise BatchJobsError(
            f"not a valid database URL: {mask_url(str(url))!r} (write an @ in the password as %40)"
        )
    # Before the driver is imported: a database batchjobs does not support is named as such.
    store_class(parsed.get_backend_name())
    drivername = driver_for(parsed.drivername)
    if drivername is not None:
        parsed = parsed.set(drivername=drivername)
    return parsed


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe for logs and error messages."""
    try:
        parsed = make_url(url)
        if "password" in parsed.query:  # libpq also takes the password as a query parameter
            parsed = parsed.update_query_dict({"password": "***"})
        if parsed.host is None or "@" not in parsed.host:
            return parsed.render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        pass
    # Not parseable, or an unescaped "@" in the password: hide all the credentials.
    raw = str(url)
    scheme, sep, rest = raw.partition("://")
    credentials, at, host = rest.rpartition("@")
    if sep and at:
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    if "@" in raw:  # a mistyped scheme: everything before the host may be credentials
        return "***@" + raw.rpartition("@")[2]
    return raw


#: Seconds an engine from :func:`create_engine` waits for a server to answer a new connection.
#: Without one, psycopg waits 130 s on a server that accepts the connection and never answers,
#: and every cron run meanwhile piles up behind it.
DEFAULT_CONNECT_TIMEOUT = 5

def create_engine(url: str | URL, *, connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT, **kwargs: Any) -> Engine:
    """An engine set up the way batchjobs needs it for this kind of database.

    ``connect_timeout`` (seconds) bounds the wait for a server to answer a new connection, unless
    the URL (``?connect_timeout=N``), ``connect_args`` or the driver's environment set their own;
    None leaves it to the driver.
    """
    parsed = parse_url(url)
    try:
        engine = sqlalchemy.create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, ValueError) as exc:
        install = driver_install(parsed.drivername) if isinstance(exc, ImportError) else None
        hint = f" (install its driver: {install})" if install else ""
        raise BatchJobsError(f"cannot use database URL {mask_url(parsed)!r}: {exc}{hint}") from None
    configured(engine, connect_timeout=connect_timeout)
    return engine


def connect(engine: Engine) -> Connection:
    """Open a connection, or explain in one line why the database cannot be reached."""
    try:
        return engine.connect()
    except DBAPIError as exc:
        raise BatchJobsError(f"cannot connect to {mask_url(engine.url)}: {first_line(exc, engine.url)}") from None


def first_line(exc: DBAPIError, url: URL | None = None) -> str:
    """The driver's own message, first line only, never with a password in it."""
    lines = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
    message = lines[0] if lines else type(exc.orig or exc).__name__
    if url is not None and url.password:
        message = message.replace(str(url.password), "***")
    return message


def schema_revision(connection: Connection) -> str | None:
    """The revision of batchjobs' own tables, or None when they were never created."""
    return store_for(connection.engine).schema_revision(connection)


def check_schema(connection: Connection) -> None:
    """Raise :class:`SchemaOutOfDate` unless batchjobs' tables are at the revision this code needs."""
    revision = schema_revision(connection)
    if revision == SCHEMA_REVISION:
        return
    where = mask_url(connection.engine.url)
    if revision is None:
        raise SchemaOutOfDate(f"batchjobs tables are missing in {where}: run `batchjobs migrate`")
    raise SchemaOutOfDate(
        f"batchjobs tables in {where} are at revision {revision}, this version needs {SCHEMA_REVISION}: "
        "run `batchjobs migrate`"
    )


@contextmanager
def connection_for(bind: Engine | Connection) -> Iterator[Connection]:
    """A connection to work on: ``bind`` itself when it is one (the caller's, left open), else a
    new connection of the engine ``bind``, closed afterwards, on a database whose batchjobs
    tables are up to date."""
    if isinstance(bind, Connection):
        yield bind
        return
    with connect(bind) as connection:
        check_schema(connection)
        yield connection


def ensure_schema(engine: Engine) -> None:
    """Connect once and check batchjobs' tables, so a command fails before it changes anything."""
    with connect(engine) as connection:
        check_schema(connection)

"""One Store per database: every statement batchjobs sends lives in this package.

:func:`store_for` gives the Store of an engine; the rest of batchjobs asks it, never the engine's
dialect, what to send.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary, WeakSet

from sqlalchemy import Engine

from batchjobs.errors import BatchJobsError
from batchjobs.store.base import Store
from batchjobs.store.mysql import MariaDBStore, MySQLStore
from batchjobs.store.postgresql import PostgreSQLStore
from batchjobs.store.sqlite import SQLiteStore

STORES: dict[str, type[Store]] = {
    store.name: store for store in (PostgreSQLStore, MySQLStore, MariaDBStore, SQLiteStore)
}

# Engines batchjobs set up itself, and the engines it derived from an app's (see Store.adopt).
# Weak, so that batchjobs never keeps an engine alive, and nothing is set on the engine itself.
_configured: WeakSet[Engine] = WeakSet()
_derived: WeakKeyDictionary[Engine, Engine] = WeakKeyDictionary()


def store_class(name: str) -> type[Store]:
    """The Store for a SQLAlchemy dialect name, or one clear line naming the supported databases."""
    try:
        return STORES[name]
    except KeyError:
        raise BatchJobsError(
            f"batchjobs supports PostgreSQL, MySQL, MariaDB and SQLite; this database is {name}"
        ) from None


def driver_for(scheme: str) -> str | None:
    """``database+driver`` for a URL scheme that names no driver (``postgres://``), if batchjobs picks one."""
    for store in STORES.values():
        if scheme in store.schemes and store.default_driver:
            return f"{store.name}+{store.default_driver}"
    return None


def driver_install(drivername: str) -> str | None:
    """How to install the driver of a ``database+driver`` name, where a batchjobs extra does."""
    database, _, driver = drivername.partition("+")
    store = STORES.get(database)
    if store is None or store.extra is None or driver not in ("", store.default_driver):
        return None
    return f"pip install 'batchjobs[{store.extra}]'"


def configured(engine: Engine, *, connect_timeout: float | None = None) -> Store:
    """Set up an engine batchjobs created itself."""
    cls = store_class(engine.dialect.name)
    cls.configure(engine, connect_timeout=connect_timeout)
    _configured.add(engine)
    return cls(engine)


def store_for(engine: Engine) -> Store:
    """The Store for any engine batchjobs is handed.

    Engines from :func:`batchjobs.create_engine` are used as they are; for an engine the app
    created, the Store decides (SQLite works through an engine derived from it, once, so the
    app's engine is never changed).
    """
    cls = store_class(engine.dialect.name)
    if engine in _configured:
        return cls(engine)
    derived = _derived.get(engine)
    if derived is None:
        derived = cls.adopt(engine)
        if derived is not engine:
            _derived[engine] = derived
            _configured.add(derived)
    return cls(derived)


__all__ = ["STORES", "Store", "configured", "driver_for", "driver_install", "store_class", "store_for"]

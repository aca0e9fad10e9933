"""Drain the pending backlog once with ``batchjobs.run_pending`` and print the time as JSON.

    python benchmarks/drain_once.py --root DIR --url URL --job JOB [--listener] [--no-clock]
    python benchmarks/drain_once.py --root DIR --url URL --setup

run.py starts it with ``PYTHONPATH=<DIR>:<this folder>``, DIR being a checkout of this repository
(the current one, or a git worktree of another revision), after loading the backlog; every
revision's drain is measured by this same script in a process of its own. ``--setup`` instead
creates the benchmark app's tables and batchjobs' own (with that revision's migrations) in an
empty database.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event


def import_batchjobs(root: Path) -> None:
    """Import batchjobs, failing unless it comes from ``root``: an installed copy (editable or
    not) would otherwise silently stand in for the revision being measured."""
    import batchjobs

    where = Path(batchjobs.__file__).resolve()
    if not where.is_relative_to(root):
        sys.exit(f"drain_once: batchjobs was imported from {where}, not from {root}; check PYTHONPATH")


def import_migrations(root: Path) -> None:
    """Import ``batchjobs.migrations`` from ``root``'s top-level migrations/ folder.

    pyproject.toml ships that folder as ``batchjobs.migrations``; an editable install maps the
    name to its own checkout, which for another revision would be the wrong migrations.
    """
    folder = root / "migrations"
    if (root / "batchjobs" / "migrations").is_dir() or not (folder / "__init__.py").is_file():
        import batchjobs.migrations  # noqa: F401 - a revision that keeps them inside the package
    else:
        spec = importlib.util.spec_from_file_location(
            "batchjobs.migrations", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["batchjobs.migrations"] = module
        spec.loader.exec_module(module)
    where = Path(sys.modules["batchjobs.migrations"].__file__ or "").resolve()
    if not where.is_relative_to(root):
        sys.exit(f"drain_once: batchjobs.migrations was imported from {where}, not from {root}")


def noop_listener(*_args: Any) -> None:
    """What a tracing tool's hook costs at the least: being called for every statement."""


def setup(url: str) -> None:
    import benchapp

    benchapp.create_tables(url)


def drain(url: str, job: str, listener: bool, clock: bool) -> float:
    import benchapp

    from batchjobs import run_pending
    from batchjobs.db import create_engine

    if listener:
        # On the Engine class, as a tracing tool instruments every engine, and before the engine
        # exists, so nothing could have set up its execution path without it.
        event.listen(sqlalchemy.Engine, "before_cursor_execute", noop_listener)
    engine = create_engine(url)  # an app has its engine already; only run_pending is timed
    try:
        started = time.perf_counter()
        # Without the clock: no run history (its heartbeats come every few seconds) and no chunk
        # committed early for taking over a second, so what the run does depends on the rows alone.
        unclocked: dict[str, Any] = {} if clock else {"commit_interval": 3600, "record": False}
        run_pending(benchapp.jobs, engine, jobs=[job], batch_size=benchapp.BATCH_SIZE, **unclocked)
        return time.perf_counter() - started
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="The checkout batchjobs must be imported from.")
    parser.add_argument("--url", required=True, help="The database, with the backlog loaded.")
    parser.add_argument("--job", help="The benchapp job to drain.")
    parser.add_argument("--listener", action="store_true", help="Install a no-op global before_cursor_execute listener first.")
    parser.add_argument(
        "--no-clock",
        action="store_true",
        help="Leave out what the clock drives (heartbeats, early commits of slow chunks), as for counting instructions.",
    )
    parser.add_argument("--setup", action="store_true", help="Create the tables in an empty database instead of draining.")
    args = parser.parse_args()
    root = args.root.resolve()
    import_batchjobs(root)
    if args.setup:
        import_migrations(root)
        setup(args.url)
        print(json.dumps({"setup": True}))
    elif args.job:
        print(json.dumps({"seconds": drain(args.url, args.job, args.listener, not args.no_clock)}))
    else:
        parser.error("give --job or --setup")


if __name__ == "__main__":
    main()

"""batchjobs: background jobs driven by flag columns on your own tables.

The app inserts rows (their flag defaults to pending) or flips a flag back to pending; cron runs
``batchjobs run-pending``, which claims pending rows with ``SELECT ... FOR NO KEY UPDATE SKIP
LOCKED``, runs the job's handler and marks them done, all in the rows' own transaction.

Everything the command line does is a function here, called as ``function(registry, engine, ...)``.
Functions that change data take an Engine and commit their own work; functions that only read
take an Engine or a Connection (a connection stays the caller's, its transaction untouched).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchjobs.admin import ChangeResult, Preview, Selection, change_rows, preview_change
    from batchjobs.backfill import BackfillInfo, BackfillResult, dry_run_backfill, list_backfills, run_backfill
    from batchjobs.check import CheckResult, Threshold, run_check
    from batchjobs.db import create_engine
    from batchjobs.errors import BatchJobsError, SchemaOutOfDate
    from batchjobs.failures import Backoff, FailureInfo, list_failures, retry, show_failure
    from batchjobs.monitoring import JobInfo, RunInfo, Status, last_run, list_jobs, status
    from batchjobs.registry import Backfill, BackfillContext, FlagJob, JobContext, Registry, flag_column, pending_index
    from batchjobs.runner import run_pending
    from batchjobs.schema import migrate
    from batchjobs.signals import StopRequest
    from batchjobs.summary import JobStats, RunSummary
    from batchjobs.timeouts import JobTimeout
    from batchjobs.workers import run_concurrently

# Where each public name lives. They are imported on first use, so that a cron tick that needs
# the run loop does not pay for importing admin, backfill and monitoring code as well.
_WHERE = {
    "Backfill": "batchjobs.registry",
    "BackfillContext": "batchjobs.registry",
    "BackfillInfo": "batchjobs.backfill",
    "BackfillResult": "batchjobs.backfill",
    "Backoff": "batchjobs.failures",
    "BatchJobsError": "batchjobs.errors",
    "ChangeResult": "batchjobs.admin",
    "CheckResult": "batchjobs.check",
    "FailureInfo": "batchjobs.failures",
    "FlagJob": "batchjobs.registry",
    "JobContext": "batchjobs.registry",
    "JobInfo": "batchjobs.monitoring",
    "JobStats": "batchjobs.summary",
    "JobTimeout": "batchjobs.timeouts",
    "Preview": "batchjobs.admin",
    "Registry": "batchjobs.registry",
    "RunInfo": "batchjobs.monitoring",
    "RunSummary": "batchjobs.summary",
    "SchemaOutOfDate": "batchjobs.errors",
    "Selection": "batchjobs.admin",
    "Status": "batchjobs.monitoring",
    "StopRequest": "batchjobs.signals",
    "Threshold": "batchjobs.check",
    "change_rows": "batchjobs.admin",
    "create_engine": "batchjobs.db",
    "dry_run_backfill": "batchjobs.backfill",
    "flag_column": "batchjobs.registry",
    "last_run": "batchjobs.monitoring",
    "list_backfills": "batchjobs.backfill",
    "list_failures": "batchjobs.failures",
    "list_jobs": "batchjobs.monitoring",
    "migrate": "batchjobs.schema",
    "pending_index": "batchjobs.registry",
    "preview_change": "batchjobs.admin",
    "retry": "batchjobs.failures",
    "run_backfill": "batchjobs.backfill",
    "run_check": "batchjobs.check",
    "run_concurrently": "batchjobs.workers",
    "run_pending": "batchjobs.runner",
    "show_failure": "batchjobs.failures",
    "status": "batchjobs.monitoring",
}

__all__ = [
    "Backfill",
    "BackfillContext",
    "BackfillInfo",
    "BackfillResult",
    "Backoff",
    "BatchJobsError",
    "ChangeResult",
    "CheckResult",
    "FailureInfo",
    "FlagJob",
    "JobContext",
    "JobInfo",
    "JobStats",
    "JobTimeout",
    "Preview",
    "Registry",
    "RunInfo",
    "RunSummary",
    "SchemaOutOfDate",
    "Selection",
    "Status",
    "StopRequest",
    "Threshold",
    "change_rows",
    "create_engine",
    "dry_run_backfill",
    "flag_column",
    "last_run",
    "list_backfills",
    "list_failures",
    "list_jobs",
    "migrate",
    "pending_index",
    "preview_change",
    "retry",
    "run_backfill",
    "run_check",
    "run_concurrently",
    "run_pending",
    "show_failure",
    "status",
]


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'batchjobs' has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""batchjobs: background jobs driven by flag columns on your own tables.

The app inserts rows (their flag defaults to pending) or flips a flag back to pending; cron runs
``batchjobs run-pending``, which claims pending rows with ``SELECT ... FOR NO KEY UPDATE SKIP
LOCKED``, runs the job's handler and marks them done, all in the rows' own transaction.
"""

from batchjobs.errors import BatchJobsError, SchemaOutOfDate
from batchjobs.failures import Backoff
from batchjobs.registry import Backfill, BackfillContext, FlagJob, JobContext, Registry, flag_column, pending_index
from batchjobs.runner import JobTimeout, RunSummary, StopRequest, run_pending

__all__ = [
    "Backfill",
    "BackfillContext",
    "Backoff",
    "BatchJobsError",
    "FlagJob",
    "JobContext",
    "JobTimeout",
    "Registry",
    "RunSummary",
    "SchemaOutOfDate",
    "StopRequest",
    "flag_column",
    "pending_index",
    "run_pending",
]

"""The welcome-email example on a Celery cluster: the same job, run by Celery's workers and beat.

    celery -A batchjobs.examples.welcome.celery_app worker -Q mail
    celery -A batchjobs.examples.welcome.celery_app beat

The broker is $CELERY_BROKER_URL (default: the Redis at 127.0.0.1:6379); the database, as for the
`batchjobs` command, $BATCHJOBS_DATABASE_URL or $DATABASE_URL. The signup code opts into instant
dispatch with ``welcome_jobs.dispatch_on_commit(session)``; beat's sweep of the ``mail`` queue
every minute replaces the crontab line.
"""

from __future__ import annotations

import os

from batchjobs.examples.welcome.app import jobs
from celery import Celery

from batchjobs.celery import install

app = Celery("welcome", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
welcome_jobs = install(app, jobs)

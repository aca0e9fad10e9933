"""The test app's jobs in a Celery app, for real `celery worker` processes and the tests that send to them.

Workers are started with ``celery -A celeryapp worker`` and take their broker, result backend,
queue prefix and sweep interval from the environment; a test builds the same app in its own
process with :func:`make_app` to send tasks.
"""

from __future__ import annotations

import os

import jobapp
from celery import Celery

from batchjobs.celery import CeleryJobs, install


def make_app(broker: str, backend: str | None, queue_prefix: str = "", sweep_every: float | None = None) -> tuple[Celery, CeleryJobs]:
    app = Celery("celeryapp", broker=broker, backend=backend or None, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        # One message at a time per process: a blocked task holds back no other message.
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    return app, install(app, jobapp.jobs, sweep_every=sweep_every, queue_prefix=queue_prefix)


app, celery_jobs = make_app(
    os.environ.get("CELERYAPP_BROKER", "memory://"),
    os.environ.get("CELERYAPP_BACKEND"),
    os.environ.get("CELERYAPP_QUEUE_PREFIX", ""),
    float(os.environ["CELERYAPP_SWEEP_EVERY"]) if os.environ.get("CELERYAPP_SWEEP_EVERY") else None,
)

"""`batchjobs demo`: the welcome-email example app, end to end, on a real database."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from batchjobs.db import create_engine, mask_url
from batchjobs.runner import run_pending
from batchjobs.schema import migrate
from batchjobs.summary import RunSummary

DEFAULT_DATABASE_URL = "sqlite:///batchjobs-demo.sqlite3"
APP = "batchjobs.examples.welcome.app:jobs"


@dataclass
class DemoReport:
    database: str
    revision: str | None
    signups: int
    unconfirmed: int
    first_run: RunSummary
    second_run: RunSummary
    waiting: int
    delivered_to: str
    #: The folder the emails went to, or None when they went to $SMTP_URL.
    outbox: str | None


def run_demo(database_url: str | None = None, signups: int = 300, outbox: Path = Path("outbox")) -> DemoReport:
    """Create the example tables, sign up ``signups`` users, and run their welcome-email job twice.

    Every tenth user has not confirmed their email, so the job's ``where=`` keeps them pending.
    Emails go to ``$SMTP_URL`` when set, otherwise to ``outbox`` as .eml files.
    """
    from batchjobs.examples.welcome.app import Base, User, jobs

    os.environ.setdefault("OUTBOX_DIR", str(outbox))
    engine = create_engine(database_url or DEFAULT_DATABASE_URL)
    try:
        Base.metadata.create_all(engine)
        _, revision = migrate(engine)
        with Session(engine) as session, session.begin():
            first_id = (session.scalar(select(func.max(User.id))) or 0) + 1
            session.execute(
                insert(User),
                [
                    {
                        "email": f"user{n}@example.com",
                        "name": f"User {n}",
                        "email_confirmed": n % 10 != 0,
                    }
                    for n in range(first_id, first_id + signups)
                ],
            )
        first = run_pending(jobs, engine)
        second = run_pending(jobs, engine)
        with Session(engine) as session:
            waiting = session.scalar(
                # This demo's signups only: a demo run again in the same folder adds to the last one's.
                select(func.count()).where(
                    User.id >= first_id, User.welcome_email_sent.is_(False), User.email_confirmed.is_(False)
                )
            )
    finally:
        engine.dispose()
    return DemoReport(
        database=mask_url(engine.url),
        revision=revision,
        signups=signups,
        unconfirmed=sum(1 for n in range(first_id, first_id + signups) if n % 10 == 0),
        first_run=first,
        second_run=second,
        waiting=waiting or 0,
        delivered_to=mask_url(os.environ["SMTP_URL"]) if os.environ.get("SMTP_URL") else os.environ["OUTBOX_DIR"],
        outbox=None if os.environ.get("SMTP_URL") else os.environ["OUTBOX_DIR"],
    )

"""A signup flow whose welcome emails are sent by batchjobs.

The web app only inserts users; `welcome_email_sent` defaults to pending. Cron runs

    batchjobs -A batchjobs.examples.welcome.app:jobs run-pending --max-runtime 55s

which sends each confirmed user one welcome email and marks the row done.
"""

from __future__ import annotations

from datetime import datetime

from batchjobs.examples.welcome.mail import deliver, welcome_message
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from batchjobs import JobContext, Registry, flag_column, pending_index


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    email_confirmed: Mapped[bool] = mapped_column(default=True)
    welcome_email_sent: Mapped[bool] = flag_column()
    welcome_email_sent_at: Mapped[datetime | None]


# Finding pending users reads this small index, never the whole table.
pending_index(User.welcome_email_sent)

jobs = Registry()


@jobs.flag_job(
    User.welcome_email_sent,
    queue="mail",
    where=User.email_confirmed.is_(True),
    done_at=User.welcome_email_sent_at,
)
def send_welcome_email(user: User, ctx: JobContext) -> None:
    # At-least-once: after a crash this may run again for the same user. The outbox file is
    # named by user id, so a repeat overwrites instead of duplicating.
    deliver(welcome_message(user.id, user.email, user.name))
    ctx.logger.info("welcome email sent to user %s", user.id)

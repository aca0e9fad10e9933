"""A small app used by the tests, in-process and through the real CLI in subprocesses.

Handlers leave an external side effect (a line appended to a file, outside any transaction) so
tests can count how often each row was really handled. Their behaviour is steered by environment
variables, so a subprocess run behaves as the test asks.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import DateTime, ForeignKey, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from batchjobs import BackfillContext, JobContext, Registry, flag_column, pending_index


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    category: Mapped[str] = mapped_column(String(20), default="a")
    note: Mapped[str | None] = mapped_column(String(100))
    processed: Mapped[bool] = flag_column()
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ItemComment(Base):
    """References items: claiming an item must not block inserting a comment on it."""

    __tablename__ = "item_comments"

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    receipt_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    thumbnail_done: Mapped[bool] = flag_column()


pending_index(Item.processed)
pending_index(Order.receipt_sent_at)
pending_index(Image.thumbnail_done)


def _ids(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x}


@dataclass
class Behaviour:
    """What the handlers do besides recording their side effect."""

    effects: Path | None = None
    poison: set[int] = field(default_factory=set)
    #: Rows whose handler kills its own process, as an OOM kill or a segfault would.
    kill: set[int] = field(default_factory=set)
    block_on: int | None = None
    signal_dir: Path | None = None
    write_note: bool = False
    sleep: float = 0.0
    #: The blocking row waits in a database statement (pg_sleep, SLEEP) instead of in Python.
    block_in_db: bool = False

    @classmethod
    def from_env(cls) -> Behaviour:
        return cls(
            effects=Path(os.environ["JOBAPP_EFFECTS"]) if os.environ.get("JOBAPP_EFFECTS") else None,
            poison=_ids("JOBAPP_POISON"),
            kill=_ids("JOBAPP_KILL"),
            block_on=int(os.environ["JOBAPP_BLOCK_ON"]) if os.environ.get("JOBAPP_BLOCK_ON") else None,
            signal_dir=Path(os.environ["JOBAPP_SIGNAL_DIR"]) if os.environ.get("JOBAPP_SIGNAL_DIR") else None,
            write_note=bool(os.environ.get("JOBAPP_WRITE_NOTE")),
            sleep=float(os.environ.get("JOBAPP_SLEEP", "0")),
            block_in_db=bool(os.environ.get("JOBAPP_BLOCK_IN_DB")),
        )


behaviour = Behaviour.from_env()


def effect(job: str, row_id: int) -> None:
    """Append one line, in one write(2), so concurrent processes never interleave."""
    if behaviour.effects is not None:
        fd = os.open(behaviour.effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{job} {row_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


def _handle(job: str, row_id: int) -> None:
    effect(job, row_id)
    if behaviour.sleep:
        time.sleep(behaviour.sleep)
    reached = behaviour.signal_dir / f"reached-{row_id}" if behaviour.signal_dir else None
    if row_id == behaviour.block_on and reached is not None and not reached.exists():
        # Tell the test this row is in progress, then wait until it says go (or kills us).
        # Only the first time: after a kill, whoever takes the row over goes straight on.
        reached.touch()
        release = reached.with_name(f"release-{row_id}")
        while not release.exists():
            time.sleep(0.01)
    if row_id in behaviour.kill:
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # pid 1 of a pid namespace (a container) ignores its own SIGKILL
    if row_id in behaviour.poison:
        raise ValueError(f"poison row {row_id}")


jobs = Registry()


@jobs.flag_job(Item.processed, queue="items", batch_size=50, done_at=Item.processed_at, pending_since=Item.created_at)
def process_item(item: Item, ctx: JobContext) -> None:
    if behaviour.write_note:
        item.note = f"handled by {os.getpid()}"
        ctx.session.flush()
    reached = behaviour.signal_dir / f"reached-{item.id}" if behaviour.signal_dir else None
    if behaviour.block_in_db and item.id == behaviour.block_on and reached is not None and not reached.exists():
        reached.touch()
        sleep = "SELECT pg_sleep(600)" if ctx.session.get_bind().dialect.name == "postgresql" else "SELECT SLEEP(600)"
        ctx.session.execute(text(sleep))
    _handle("process_item", item.id)


@jobs.flag_job(Order.receipt_sent_at, queue="mail")
def send_receipt(order: Order) -> None:
    _handle("send_receipt", order.id)


@jobs.flag_job(Image.thumbnail_done, queue="media", batch=True, batch_size=20)
def make_thumbnails(images: list[Image]) -> None:
    for image in images:
        effect("make_thumbnails", image.id)
    if any(image.id in behaviour.poison for image in images):
        raise ValueError("poison image in batch")


@jobs.backfill(select(Item).where(Item.note.is_(None)), chunk_size=100)
def fill_notes(items: list[Item], ctx: BackfillContext) -> None:
    # Never more than one chunk in memory: the session holds this chunk and the cursor row.
    assert len(ctx.session.identity_map) <= len(items) + 1, len(ctx.session.identity_map)
    for item in items:
        item.note = "filled"
        _handle("fill_notes", item.id)

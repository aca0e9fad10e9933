"""Crash accounting: rows whose handler took its worker down are counted, set apart, and finally dead.

A handler that kills its process (kill -9, OOM, a segfault), or during which the server ends the
chunk's transaction, leaves no failure record: the chunk rolls back with everything in it. Left
alone, every run would claim the same chunk, repeat the side effects of the rows before the bad
one, and die on it again.

So before a chunk's handlers run, the worker writes down which rows they are about to handle in
a marker file of its own (:class:`InflightMarker`): a write to the operating system's page cache,
which outlives the process, and costs no database round trip. A run that starts later on the
same host and finds the marker of a worker that is gone counts one attempt and one crash for each of those rows that is still
pending and has no failure recorded since: rows the worker finished are done, rows that failed
have their record. Markers are per host: cron runs on every host, so each host's next run counts
its own crashes.

A worker holds a lock on its marker file for as long as it works (``flock``; the kernel lets go
of it when the process ends, however it ends). A marker nobody holds is a worker gone, or one
that ended with an error and closed it. Process ids would not tell: a worker that is a
container's main process is pid 1 again after every restart.

Rows with a crash are suspects: claims leave them out of ordinary chunks, and each runs later in
a chunk of its own, so a bad row can no longer take good ones with it, and the good ones get
through. A row that crashed ``max_crashes`` times is dead, with a reason that says so.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
import zlib
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from batchjobs.errors import BatchJobsError
from batchjobs.failures import RowFailure
from batchjobs.store import Store

if TYPE_CHECKING:
    from batchjobs.registry import FlagJob

logger = logging.getLogger("batchjobs")


class Crashed(Exception):
    """The recorded error of an attempt that ended its worker or its transaction."""


# Failure records name an error by its module and class: this one by the place users import it from.
Crashed.__module__ = "batchjobs"

REASON = (
    "the worker handling this row went away before its chunk committed (killed, out of memory, a crash, "
    "or its transaction ended by the server); the row now runs in a chunk of its own"
)


def marker_dir(store: Store) -> Path:
    """Where this host's workers on this database keep their markers.

    $BATCHJOBS_STATE_DIR, or a folder of this user's in the temporary directory; one subfolder
    per database (named by a hash of its URL without the password).
    """
    base = os.environ.get("BATCHJOBS_STATE_DIR") or os.path.join(tempfile.gettempdir(), f"batchjobs-{os.getuid()}")
    database = store.engine.url.render_as_string(hide_password=True)
    return Path(base) / hashlib.sha256(database.encode()).hexdigest()[:16]


class InflightMarker:
    """One worker's marker file: the rows its handlers are about to handle, rewritten per chunk."""

    def __init__(self, folder: Path) -> None:
        # Unique even where process ids repeat (containers sharing the folder, restarts as pid 1).
        self.path = folder / f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:12]}.json"
        # Locked before it appears under its name, so that no run ever finds it unlocked and takes
        # it for a dead worker's. The lock is held while this worker works.
        unlisted = self.path.with_suffix(".new")
        with _unwritable(folder):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.fd = os.open(unlisted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            os.rename(unlisted, self.path)
        self.size = 0

    def set(self, job: str, row_keys: Sequence[str], now: datetime) -> None:
        header: dict[str, Any] = {"pid": os.getpid(), "job": job, "started_at": now.isoformat(), "count": len(row_keys)}
        # A header line, then a key per line: joining strings costs a fraction of encoding a
        # hundred of them as JSON, and this is written for every chunk. A key that holds a line
        # break makes the line count come out wrong: that chunk's keys go into the header instead.
        joined = "\n".join(row_keys)
        if joined.count("\n") != len(row_keys) - 1:
            header["row_keys"], joined = list(row_keys), ""
        keys = joined.encode()
        # A process killed in the middle of a write longer than a page can leave the start of
        # this marker over the end of the last one: the checksum tells a reader.
        header["crc32"] = zlib.crc32(keys)
        payload = json.dumps(header).encode() + b"\n" + keys + b"\n"
        # One write at offset 0, padded over what a longer earlier marker left rather than cut
        # with a second system call: the reader takes the header's count of lines.
        self.size = max(self.size, len(payload))
        padded = payload.ljust(self.size, b"\n")
        with _unwritable(self.path.parent):
            # A write cut short (the disk or the file size limit reached) says why when the rest is written.
            written = os.pwrite(self.fd, padded, 0)
            while written < len(padded):
                more = os.pwrite(self.fd, padded[written:], written)
                if not more:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += more

    def close(self, *, ended_well: bool) -> None:
        """A worker that ended well removes its marker; one that ended with an error leaves it,
        unlocked, so that the next run counts its rows although this process may live on (a
        thread pool)."""
        try:
            if ended_well:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


@contextmanager
def _unwritable(folder: Path) -> Iterator[None]:
    """A marker that cannot be written stops the run before any handler runs: without it, a row
    that takes its worker down would do so again at every run."""
    try:
        yield
    except OSError as error:
        raise BatchJobsError(
            f"cannot write crash markers in {folder}: {error.strerror or error} "
            "(set BATCHJOBS_STATE_DIR to a folder of this user's with room)"
        ) from error


@dataclass
class AbandonedMarker:
    """The marker of a worker that went away, taken by this run: renamed aside and locked while
    its crashes are counted, then removed once they are committed, or put back for a later run.

    The lock is the taking: a run that dies while counting lets go of it, and the next run takes
    the marker over under its aside name. A locked aside name is a count in progress.
    """

    #: Its name while its worker lived (unique: no later marker takes it).
    path: Path
    #: Its name while this run counts it.
    taken: Path
    #: The open file this run holds the lock through.
    fd: int
    job: str
    pid: int
    started_at: datetime
    row_keys: list[str]

    def count(self, store: Store, connection: Connection, job: FlagJob, now: datetime) -> int:
        """Record a crash for each of its rows still pending with no failure recorded since it was
        written, in the caller's transaction; returns how many, said in one line when any."""
        keys = store.still_attempted(connection, job, self.row_keys, self.started_at)
        store.record_failures(connection, job, [RowFailure(key, 0, Crashed(REASON), crashed=True) for key in keys], now)
        if keys:
            shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
            logger.warning(
                "job %s: a worker (pid %d) went away while handling rows %s; each counts a crash and runs apart",
                job.name,
                self.pid,
                shown,
                extra={"job": job.name, "outcome": "crashed"},
            )
        return len(keys)

    def drop(self) -> None:
        """Its crashes are committed: nobody counts it again."""
        try:
            self.taken.unlink(missing_ok=True)
        finally:
            os.close(self.fd)

    def put_back(self) -> None:
        """Its crashes could not be counted now: a later run finds it where it was."""
        try:
            os.rename(self.taken, self.path)
        except OSError as error:
            logger.warning(
                "crash marker %s could not be put back (%s); the crash it tells of is not counted", self.path.name, error
            )
        finally:
            os.close(self.fd)


def take_abandoned(store: Store, jobs: Collection[str], known: Collection[str]) -> tuple[list[AbandonedMarker], set[str]]:
    """The markers of the workers on this host that went away, of these jobs, taken by this run
    (each is this run's to :meth:`~AbandonedMarker.drop` or :meth:`~AbandonedMarker.put_back`);
    and the jobs whose crashes another run is counting at this moment.

    Markers of the app's other (``known``) jobs are left alone, for the runs of those jobs;
    markers of jobs the app no longer has are removed. Costs a look at one small folder when
    there is nothing to do.
    """
    folder = marker_dir(store)
    try:
        paths = sorted(folder.glob("*.json")) + sorted(folder.glob(f"*.json{_TAKEN}*"))
    except OSError:
        return [], set()
    taken: list[AbandonedMarker] = []
    counting: set[str] = set()
    for path in paths:
        found = _take(path, jobs, known)
        if isinstance(found, AbandonedMarker):
            taken.append(found)
        elif found is not None:
            counting.add(found)
    return taken, counting


#: What a marker's name gets while a run counts its crashes, followed by that run's pid.
_TAKEN = ".taken-"


def _take(path: Path, jobs: Collection[str], known: Collection[str]) -> AbandonedMarker | str | None:
    """Take an abandoned marker of one of ``jobs``; the job's name if another run is counting it
    now; None for a live worker's, another ``known`` job's, or one that is removed: with no rows
    (its worker never started a chunk), unreadable, or of a job the app no longer has."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _TAKEN not in path.name:
                return None  # its worker is still at work
            # Another run counts it: its rows must wait for that count, not run in ordinary chunks.
            job = _job_of(path)
            return job if job in jobs else None
        original = path.with_name(path.name.split(_TAKEN)[0])
        data = path.read_bytes()
        if not data:
            path.unlink(missing_ok=True)
            return None
        header = _parse(data)
        if header["job"] not in jobs:
            if header["job"] not in known:
                path.unlink(missing_ok=True)
            return None
        taken = original.with_name(f"{original.name}{_TAKEN}{os.getpid()}")
        os.rename(path, taken)
        marker = AbandonedMarker(
            original,
            taken,
            fd,
            header["job"],
            header["pid"],
            datetime.fromisoformat(header["started_at"]),
            header["row_keys"],
        )
        fd = -1  # the marker's now
        return marker
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("crash marker %s could not be read (%s); the crash it may tell of is not counted", path.name, error)
        path.unlink(missing_ok=True)
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _job_of(path: Path) -> str | None:
    try:
        return str(_parse(path.read_bytes())["job"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parse(data: bytes) -> dict[str, Any]:
    """A marker's header, its ``row_keys`` read from the lines after it (see :meth:`InflightMarker.set`)."""
    first, _, rest = data.partition(b"\n")
    header = dict(json.loads(first))
    if "row_keys" not in header:  # else the release before's marker, or keys with line breaks
        lines = rest.split(b"\n")[: header["count"]]
        if zlib.crc32(b"\n".join(lines)) != header["crc32"]:
            raise ValueError("its keys were cut short by the end of the process that wrote them")
        header["row_keys"] = [line.decode() for line in lines]
    return header

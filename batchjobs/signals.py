"""Stopping politely, and aborting: SIGTERM and Ctrl-C ask a run, a worker or a backfill to
finish its row and commit; a second Ctrl-C aborts the chunk in progress.

The abort never raises an exception into the code that runs: a KeyboardInterrupt raised while a
driver waits for the server, or inside SQLAlchemy's savepoint handling, leaves the connection in
the middle of an exchange, and the rollback that follows can wait forever. Instead the statement
in flight is cancelled on the server, each run forgets its crash marker (an abort is not a
crash), and the process ends at once with status 130. Ending the process closes its database
connections, and the server rolls back their open transactions: the chunk's rows are pending
again, with no failure recorded for them.

Signals are read by a thread of their own (through :func:`signal.set_wakeup_fd`), so Ctrl-C is
answered at once even while the main thread waits in C code that runs no Python signal handler
(SQLite waiting for another process's write lock, say).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

#: The exit status of a run aborted by a second Ctrl-C, as a shell reports a process ended by SIGINT.
ABORTED = 130
#: What a process-pool worker takes from its parent: stop as after Ctrl-C, and abort.
RELAYED_STOP = signal.SIGUSR1
RELAYED_ABORT = signal.SIGUSR2

STOPPING_LINE = b"batchjobs: stopping after the current row; press Ctrl-C again to abort it\n"
ABORTED_LINE = b"batchjobs: aborted; the chunk in progress was rolled back and its rows are pending again\n"


class StopRequest:
    """Set from a signal handler (or another thread); loops stop after the current row or chunk.

    The first reason given is the one kept: a run stopped by Ctrl-C stays stopped by SIGINT
    when a SIGTERM follows.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


_hooks: list[Callable[[], None]] = []
_hooks_lock = threading.Lock()


@contextmanager
def on_abort(hook: Callable[[], None]) -> Iterator[None]:
    """While active, ``hook`` runs (from another thread) when the process aborts.

    Hooks run last registered first; each must be quick and must not wait for the main thread.
    """
    with _hooks_lock:
        _hooks.append(hook)
    try:
        yield
    finally:
        with _hooks_lock:
            if hook in _hooks:
                _hooks.remove(hook)


def abort(*, say: bool = True) -> None:
    """Run the abort hooks, say so in one line, and end the process with status 130 at once."""
    with _hooks_lock:
        hooks = list(reversed(_hooks))
    for hook in hooks:
        try:
            hook()
        except Exception:  # noqa: BLE001 - the process ends anyway; each hook is best effort
            pass
    if say:
        os.write(2, ABORTED_LINE)
    os._exit(ABORTED)


@contextmanager
def stop_on_signals(
    stop: StopRequest | None = None, *, hangup: bool = False, relayed: bool = False
) -> Iterator[StopRequest]:
    """While active, SIGTERM (and with ``hangup``, SIGHUP) sets ``stop`` (a new one when not
    given) with the signal's name, and so does a first SIGINT, saying so in one line at once; a
    second SIGINT aborts (see :func:`abort`).

    With ``relayed`` (a process-pool worker) SIGINT (and with ``hangup``, SIGHUP) is ignored,
    because the terminal sends it to every process of its group and the parent decides: it
    relays a stop after Ctrl-C as :data:`RELAYED_STOP`, any other stop as SIGTERM, and an abort
    as :data:`RELAYED_ABORT`. Must be entered in the main thread.
    """
    stop = stop if stop is not None else StopRequest()
    stopping: dict[int, str] = {signal.SIGTERM: "SIGTERM"}
    if hangup and not relayed:
        stopping[signal.SIGHUP] = "SIGHUP"
    if relayed:
        stopping[RELAYED_STOP] = "SIGINT"
    # What the terminal sends its whole process group, left to the parent of a relayed worker.
    from_terminal = {signal.SIGINT, *([signal.SIGHUP] if hangup else [])} if relayed else set()

    interrupts = 0

    def react(signum: int) -> None:
        nonlocal interrupts
        if signum in stopping:
            stop.set(stopping[signum])
        elif signum == RELAYED_ABORT and relayed:
            abort(say=False)
        elif signum == signal.SIGINT and not relayed:
            interrupts += 1
            if interrupts > 1:
                abort()
            stop.set("SIGINT")
            os.write(2, STOPPING_LINE)

    handled = {*stopping, signal.SIGINT, *from_terminal, *([RELAYED_ABORT] if relayed else [])}
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def noted(signum: int, _frame: FrameType | None) -> None:
        # The C-level handler has already written the signal's number to the wakeup pipe, and
        # the watching thread acts on it. A stop is also set here, in the main thread, before
        # it goes on: a signal sent before a row ends is seen before the next row starts. The
        # watcher alone counts Ctrl-Cs, since signals that arrive together run this only once.
        if signum in stopping:
            stop.set(stopping[signum])
        elif signum == signal.SIGINT:
            stop.set("SIGINT")

    def watch() -> None:
        while True:
            try:
                received = os.read(read_end, 64)
            except OSError:
                return
            if not received:
                return
            for signum in received:
                react(signum)

    previous = {sig: signal.signal(sig, signal.SIG_IGN if sig in from_terminal else noted) for sig in handled}
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="batchjobs-signals", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        if relayed:
            # A worker whose run is over only reports and ends. What it inherited from its parent
            # would be wrong now: the parent's wakeup pipe (the parent would take this worker's
            # signals for its own), and the default action of the relayed signals (a relay that
            # arrives late would kill it while it hands its report over, holding the queue's lock).
            signal.set_wakeup_fd(-1)
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
        else:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        os.close(write_end)  # the watcher reads the end of the pipe and returns
        watcher.join(timeout=5)
        os.close(read_end)

"""Stopping politely: SIGTERM and Ctrl-C ask a run, a worker or a backfill to finish its row and commit."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class StopRequest:
    """Set from a signal handler (or another thread); loops stop after the current row or chunk."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


@contextmanager
def stop_on_signals(stop: StopRequest | None = None, *, hangup: bool = False) -> Iterator[StopRequest]:
    """While active, SIGTERM and SIGINT (and with ``hangup``, SIGHUP) set ``stop`` (a new one
    when not given) with the signal's name."""
    stop = stop if stop is not None else StopRequest()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and not stop:
            # Said at once: the current row may take a while. os.write, because print() is not
            # safe in a signal handler that may have interrupted it.
            os.write(2, b"batchjobs: stopping after the current row\n")
        stop.set(signal.Signals(signum).name)

    signals = (signal.SIGTERM, signal.SIGINT, *((signal.SIGHUP,) if hangup else ()))
    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

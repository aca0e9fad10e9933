"""Progress of long admin commands: a live line on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from batchjobs.timeutil import format_duration


class Progress:
    """Call :meth:`advance` after each committed chunk; :meth:`finish` once at the end.

    On a terminal the line is redrawn in place with rate and ETA. In cron or CI, where redrawing
    makes a mess of the log, a full line is written at most every ``interval`` seconds.
    """

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, interval: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.interactive:
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()
        elif now - self._last_line >= self.interval:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_line = now

    def finish(self) -> None:
        if self.interactive:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} rows ({100 * self.done / self.total:.0f}%)"
        else:
            text += " rows"
        text += f", {rate:,.0f} rows/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {format_duration((self.total - self.done) / rate)}"
        return text

"""Progress of long admin commands: a live line on a terminal, periodic plain lines elsewhere."""

from __future__ import annotations

import io

from batchjobs.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_at_most_every_interval_without_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress("mark-done send", 1000, stream=out, interval=3600)
    for _ in range(10):
        progress.advance(100)
    progress.finish()
    assert out.getvalue() == ""  # nothing before the interval is up: cron mail stays short
    every_time = Progress("mark-done send", 1000, stream=out, interval=0)
    every_time.advance(250)
    [line] = out.getvalue().splitlines()
    assert line.startswith("mark-done send: 250/1,000 rows (25%), ") and "rows/s, ETA " in line


def test_live_line_on_a_terminal() -> None:
    out = Terminal()
    progress = Progress("backfill fill", None, stream=out)
    progress.advance(5)
    progress.advance(5)
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") == 3 and "backfill fill: 10 rows, " in text and text.endswith("\r\x1b[K")

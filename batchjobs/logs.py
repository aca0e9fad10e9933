"""Log output for the CLI: the human format by default, or one JSON object per event."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

#: Attributes that run-pending puts on its records, copied into the JSON object when present.
FIELDS = ("job", "row_key", "duration", "outcome", "attempt", "done", "failed", "seconds", "stopped_by")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the fields above, and the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            if hasattr(record, field):
                data[field] = getattr(record, field)
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(log_format: str = "text", verbose: bool = False) -> None:
    """Send batchjobs' logs to stderr: warnings and errors, or every row with ``verbose``."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("batchjobs").setLevel(logging.INFO if verbose else logging.WARNING)

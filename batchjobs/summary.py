"""What a run did, per job: one shape for the summary line, JSON output, run history and workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchjobs.timeutil import format_duration


@dataclass
class JobStats:
    """One job's rows in a run: handled (``done``) and failed."""

    done: int = 0
    failed: int = 0


@dataclass
class RunSummary:
    """What one run did, per job."""

    jobs: dict[str, JobStats] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_by: str | None = None
    #: With --concurrency: workers that died (kill -9, OOM); their rows are pending again.
    workers_lost: int = 0

    @property
    def done(self) -> int:
        return sum(s.done for s in self.jobs.values())

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.jobs.values())

    def per_job(self) -> dict[str, list[int]]:
        """{job name: [done, failed]}: the per-job counts as the run history stores them."""
        return {name: [s.done, s.failed] for name, s in self.jobs.items()}

    def as_json(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "stopped_by": self.stopped_by,
            "workers_lost": self.workers_lost,
            "jobs": {name: {"done": s.done, "failed": s.failed} for name, s in self.jobs.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        """The summary :meth:`as_json` describes (how worker processes hand back their counts)."""
        return cls(
            jobs={name: JobStats(s["done"], s["failed"]) for name, s in data["jobs"].items()},
            seconds=data["seconds"],
            stopped_by=data["stopped_by"],
            workers_lost=data["workers_lost"],
        )

    def add(self, other: RunSummary) -> None:
        """Count in what another worker of the same invocation did."""
        for name, stats in other.jobs.items():
            mine = self.jobs.setdefault(name, JobStats())
            mine.done += stats.done
            mine.failed += stats.failed
        self.seconds = max(self.seconds, other.seconds)
        self.stopped_by = self.stopped_by or other.stopped_by
        self.workers_lost += other.workers_lost

    @property
    def outcome(self) -> str:
        """How a run that returned ended: finished, max-runtime, or interrupted by a signal."""
        return {None: "finished", "max-runtime": "max-runtime"}.get(self.stopped_by, "interrupted")

    def line(self) -> str:
        """One line for cron's mail: totals, then per job."""
        per_job = ", ".join(
            f"{name} {s.done} done" + (f"/{s.failed} failed" if s.failed else "")
            for name, s in self.jobs.items()
            if s.done or s.failed
        )
        stopped = f", stopped by {self.stopped_by}" if self.stopped_by else ""
        if self.workers_lost:
            stopped += f", {self.workers_lost} worker(s) died"
        details = f" ({per_job})" if per_job else ""
        return f"batchjobs: {self.done} done, {self.failed} failed in {format_duration(self.seconds)}{stopped}{details}"

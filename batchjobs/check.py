"""`batchjobs check`: a health check with Nagios plugin conventions, usable by Consul as is.

One line of text, performance data after ``|``, and the exit status says it all: 0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN (the check itself could not run, e.g. the database is down).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine

from batchjobs.db import connection_for
from batchjobs.errors import BatchJobsError
from batchjobs.monitoring import last_run, status
from batchjobs.registry import Registry
from batchjobs.timeutil import format_duration, parse_duration, utcnow

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


@dataclass(frozen=True)
class Threshold:
    """``CRIT`` or ``WARN,CRIT``: above WARN is a warning, above CRIT is critical."""

    warn: float | None
    crit: float | None

    @classmethod
    def parse(cls, text: str, option: str, duration: bool = False) -> Threshold:
        def number(part: str) -> float:
            if duration:
                return parse_duration(part)
            try:
                value = float(part)
            except ValueError:
                raise BatchJobsError(f"{option} {text!r}: expected a number, or WARN,CRIT") from None
            if value < 0:
                raise BatchJobsError(f"{option} {text!r}: thresholds cannot be negative")
            return value

        parts = [part.strip() for part in text.split(",")]
        try:
            if len(parts) == 1:
                return cls(None, number(parts[0]))
            if len(parts) == 2:
                warn, crit = number(parts[0]), number(parts[1])
                if warn > crit:
                    raise BatchJobsError(f"{option} {text!r}: the warning level is above the critical one")
                return cls(warn, crit)
        except BatchJobsError as exc:
            raise BatchJobsError(str(exc) if str(exc).startswith(option) else f"{option}: {exc}") from None
        raise BatchJobsError(f"{option} {text!r}: expected CRIT or WARN,CRIT")

    def state(self, value: float) -> int:
        if self.crit is not None and value > self.crit:
            return CRITICAL
        if self.warn is not None and value > self.warn:
            return WARNING
        return OK

    def perf(self, value: float, unit: str = "") -> str:
        def fmt(level: float | None) -> str:
            return "" if level is None else f"{level:g}{unit}"

        return f"{value:g}{unit};{fmt(self.warn)};{fmt(self.crit)};0"


NO_LIMIT = Threshold(None, None)


@dataclass
class CheckResult:
    """The outcome of :func:`run_check`: the exit code, what was found, and Nagios performance data.

    ``code`` is 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN; :meth:`line` is what `batchjobs check` prints.
    """

    code: int
    summary: str
    problems: list[str]
    perfdata: list[str]

    def line(self) -> str:
        """The one line `batchjobs check` prints: state, problems or summary, then perfdata after ``|``."""
        text = "; ".join(self.problems) if self.problems else self.summary
        return f"BATCHJOBS {STATE_NAMES[self.code]} - {text} | {' '.join(self.perfdata)}".rstrip(" |")


def run_check(
    registry: Registry,
    bind: Engine | Connection,
    *,
    jobs: Sequence[str] = (),
    max_pending: Threshold = NO_LIMIT,
    max_pending_age: Threshold = NO_LIMIT,
    max_dead: Threshold = NO_LIMIT,
    max_since_last_run: Threshold = NO_LIMIT,
    min_workers: int | None = None,
    queue: str | None = None,
    now: datetime | None = None,
) -> CheckResult:
    """Evaluate the thresholds for the chosen jobs (all by default) against the database. Reads only.

    With ``min_workers``, fewer live workers (of ``queue``, when given) than that is CRITICAL.
    """
    now = now or utcnow()
    chosen = {job.name for job in registry.select(jobs=jobs)}
    if queue is not None:
        registry.select(queues=[queue])  # a queue no job serves: a typo, not an outage
    with connection_for(bind) as connection:
        current = status(registry, connection, now=now)
        latest = last_run(registry, connection, job=jobs[0] if len(jobs) == 1 else None, now=now)
    code = OK
    problems: list[str] = []
    perfdata: list[str] = []

    def judge(threshold: Threshold, value: float, what: str, duration: bool = False) -> None:
        nonlocal code
        state = threshold.state(value)
        if state != OK:
            code = max(code, state)
            limit = threshold.crit if state == CRITICAL else threshold.warn
            assert limit is not None
            shown = format_duration(limit) if duration else f"{limit:g}"
            problems.append(f"{STATE_NAMES[state]}: {what} (limit {shown})")

    pending_total = dead_total = 0
    if max_pending_age is not NO_LIMIT:
        blind = sorted(name for name in chosen if registry.job(name).pending_since is None)
        if blind:
            # A limit that can never trip would be a silent OK: say the check cannot tell.
            return CheckResult(UNKNOWN, "", [f"--max-pending-age needs pending_since= on {', '.join(blind)}"], [])
    for job in (j for j in current.jobs if j.name in chosen):
        pending_total += job.pending
        dead_total += job.dead
        judge(max_pending, job.pending, f"{job.name} has {job.pending} pending")
        perfdata.append(f"'{job.name}_pending'={max_pending.perf(job.pending)}")
        if job.oldest_pending_age is not None:
            age = job.oldest_pending_age
            judge(max_pending_age, age, f"{job.name}'s oldest pending row waits {format_duration(age)}", True)
            perfdata.append(f"'{job.name}_oldest_pending_age'={max_pending_age.perf(round(age), 's')}")
        judge(max_dead, job.dead, f"{job.name} has {job.dead} dead")
        perfdata.append(f"'{job.name}_dead'={max_dead.perf(job.dead)}")
        perfdata.append(f"'{job.name}_backoff'={NO_LIMIT.perf(job.backoff)}")

    workers = [run for run in current.alive if run.kind == "worker" and run.serves(queue)]
    if min_workers is not None:
        perfdata.append(f"workers={len(workers)};;{min_workers};0")
        if len(workers) < min_workers:
            code = CRITICAL
            of_queue = f" of queue {queue}" if queue else ""
            problems.append(f"CRITICAL: {len(workers)} live worker(s){of_queue}, fewer than {min_workers}")
    if latest is None:
        last = "no run recorded yet"
        if max_since_last_run.crit is not None:
            code = CRITICAL
            problems.append("CRITICAL: no run recorded yet")
    else:
        # A live worker is a run that never stops: its jobs were just looked at.
        since = 0.0 if workers else max((now - latest.started_at).total_seconds(), 0.0)
        last = f"{len(workers)} live worker(s)" if workers else f"last run {format_duration(since)} ago ({latest.outcome})"
        judge(max_since_last_run, since, f"last run started {format_duration(since)} ago", True)
        perfdata.append(f"since_last_run={max_since_last_run.perf(round(since), 's')}")
    summary = f"{len(chosen)} job(s): {pending_total} pending, {dead_total} dead, {last}"
    return CheckResult(code=code, summary=summary, problems=problems, perfdata=perfdata)

"""The `batchjobs` command: parse, call a library function, print."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from batchjobs import failures as failures_api
from batchjobs.db import check_schema, connect, create_engine, ensure_schema, first_line, resolve_database_url
from batchjobs.errors import BatchJobsError
from batchjobs.logs import configure as configure_logging
from batchjobs.registry import Registry, load_registry
from batchjobs.text import table_lines
from batchjobs.timeutil import check_max_runtime, format_duration, parse_duration, utcnow


class _Group(click.Group):
    """Turns errors a user can fix into one line on stderr and exit status 1, never a traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # Click prints usage errors over several lines; batchjobs keeps every error to one.
        try:
            result = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "batchjobs"
            hint = self._global_hint(exc)
            if hint is not None:
                click.echo(f"Error: {hint}", err=True)
            else:
                click.echo(f"Error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    def _global_hint(self, error: click.UsageError) -> str | None:
        """For an option of the ``batchjobs`` command itself given after a subcommand: where it goes."""
        option = getattr(error, "option_name", None)
        if not isinstance(error, click.NoSuchOption) or error.ctx is None or error.ctx.parent is None:
            return None
        ours = next((p for p in self.params if option in (*p.opts, *p.secondary_opts)), None)
        if ours is None:
            return None
        command = error.ctx.info_name
        return (
            f"{option} is an option of batchjobs itself, not of {command}: "
            f"put it before the command, as in batchjobs {option} ... {command}"
        )

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchJobsError as exc:
            _traceback_if_asked()
            raise click.ClickException(str(exc)) from None
        except DBAPIError as exc:
            _traceback_if_asked()
            raise click.ClickException(f"database error: {first_line(exc)}") from None


def _traceback_if_asked() -> None:
    """With ``BATCHJOBS_DEBUG=1``, the traceback of the error being handled (and of its cause),
    before the one line that states it."""
    if os.environ.get("BATCHJOBS_DEBUG", "").strip().lower() in ("", "0", "false", "no"):
        return
    import traceback

    traceback.print_exc()


@dataclass
class _State:
    app: str | None
    database_url: str | None
    _registry: Registry | None = None

    def registry(self) -> Registry:
        if self._registry is None:
            if not self.app:
                raise BatchJobsError("no app given: pass -A module:registry or set BATCHJOBS_APP")
            self._registry = load_registry(self.app)
        return self._registry

    def engine(self, **kwargs: Any) -> Engine:
        registry_url = self.registry().database_url if self.app else None
        return create_engine(resolve_database_url(self.database_url, registry_url), **kwargs)

    def connect(self, **kwargs: Any) -> Connection:
        """A connection to a database whose batchjobs tables are up to date (``kwargs`` as for engine)."""
        connection = connect(self.engine(**kwargs))
        try:
            check_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection


class _Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in some click versions
    name = "duration"

    def __init__(self, *, run_limit: bool = False) -> None:
        #: A run's time limit, which must leave time to handle a row (see check_max_runtime).
        self.run_limit = run_limit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = parse_duration(str(value))
            if self.run_limit:
                check_max_runtime(seconds, "")
            return seconds
        except BatchJobsError as exc:
            # Raised as BatchJobsError so _Group prints it as one line, without the usage text.
            option = param.opts[-1] if param is not None else "duration"
            raise BatchJobsError(f"{option}: {exc}") from None


DURATION = _Duration()
RUN_LIMIT = _Duration(run_limit=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    return "\n".join(table_lines(headers, rows))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-A",
    "--app",
    envvar="BATCHJOBS_APP",
    metavar="MODULE:ATTR",
    help="The Registry of your jobs, e.g. myapp.jobs:jobs (or $BATCHJOBS_APP).",
)
@click.option(
    "--database-url",
    metavar="URL",
    help="Database to work on. Default: $BATCHJOBS_DATABASE_URL, then $DATABASE_URL, then the Registry's.",
)
@click.version_option(package_name="batchjobs")
@click.pass_context
def main(ctx: click.Context, app: str | None, database_url: str | None) -> None:
    """Background jobs driven by flag columns on your own tables.

    Your app inserts rows whose flag column defaults to pending; cron runs
    `batchjobs run-pending` every minute to handle them. Start with `batchjobs demo`.
    """
    configure_logging()
    ctx.obj = _State(app=app, database_url=database_url)


def _run_options(command: Any) -> Any:
    """Selection and chunk options shared by run-pending and worker."""
    options = [
        click.option("-q", "--queue", "queues", multiple=True, metavar="QUEUE", help="Only jobs of this queue (repeatable)."),
        click.option("-j", "--job", "jobs", multiple=True, metavar="NAME", help="Only this job (repeatable)."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Rows per chunk, overriding each job's batch_size."),
        click.option(
            "--commit-interval",
            type=DURATION,
            default="1s",
            show_default=True,
            metavar="DURATION",
            help="Commit a chunk early after this long, releasing the rows it has not reached yet.",
        ),
        click.option(
            "--lock-timeout",
            type=DURATION,
            default="5s",
            show_default=True,
            metavar="DURATION",
            help="Skip a job for now when its table stays locked this long (a migration holds it).",
        ),
        click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            envvar="BATCHJOBS_LOG_FORMAT",
            help="json: one JSON object per log event and for the summary (or $BATCHJOBS_LOG_FORMAT).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Log every row handled, with its duration."),
        click.option(
            "-c",
            "--concurrency",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Workers in this invocation, each on its own connection, all claiming with SKIP LOCKED.",
        ),
        click.option(
            "--pool",
            type=click.Choice(["process", "thread"]),
            default="process",
            show_default=True,
            help="process for CPU-bound handlers; thread for handlers that wait on the network (2x cores or more).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("run-pending")
@click.option(
    "--max-runtime",
    type=RUN_LIMIT,
    metavar="DURATION",
    help="Stop starting new rows after this long, e.g. 55s for a run every minute. Default: until drained.",
)
@_run_options
@click.pass_obj
def run_pending_command(
    state: _State,
    queues: tuple[str, ...],
    jobs: tuple[str, ...],
    max_runtime: float | None,
    batch_size: int | None,
    commit_interval: float,
    lock_timeout: float,
    log_format: str,
    verbose: bool,
    concurrency: int,
    pool: str,
) -> None:
    """Handle pending rows until none is left or --max-runtime is spent, then exit.

    Prints nothing when there was nothing to do, one summary line when there was
    (cron mails any output). Failures are logged to stderr with their traceback.
    SIGTERM, SIGHUP or Ctrl-C finishes the current row, commits, and exits 0; a second
    Ctrl-C aborts the chunk in progress (rolled back, its rows pending again) and exits 130.
    """
    from batchjobs.runner import run_pending

    options = dict(max_runtime=max_runtime, batch_size=batch_size, commit_interval=commit_interval, lock_timeout=lock_timeout)
    _drive(state, run_pending, "run", options, queues, jobs, log_format, verbose, concurrency, pool)


def _drive(
    state: _State,
    target: Any,
    kind: str,
    options: dict[str, Any],
    queues: tuple[str, ...],
    jobs: tuple[str, ...],
    log_format: str,
    verbose: bool,
    concurrency: int,
    pool: str,
) -> None:
    """Run ``target`` (run_pending or run_worker), or ``concurrency`` of them, and report."""
    import logging

    from batchjobs.history import error_line, partial_summary, unrecorded_end
    from batchjobs.signals import stop_on_signals
    from batchjobs.summary import RunSummary

    def report(summary: RunSummary, event: str = "run finished") -> None:
        if log_format == "json":
            click.echo(json.dumps({"event": event, **summary.as_json()}))
        else:
            click.echo(summary.line())

    configure_logging(log_format, verbose)
    registry = state.registry()
    # Threads share the engine's pool: one connection each, one for the run history, and a
    # worker's one to listen on.
    engine = state.engine(pool_size=2 * concurrency + 1) if pool == "thread" and concurrency > 1 else state.engine()
    if kind == "worker" and log_format == "text":
        # A worker may wait silently for hours: say at once that it is up, and with what.
        names = ", ".join(job.name for job in registry.select(jobs=jobs, queues=queues))
        plural = {"process": "processes", "thread": "threads"}.get(pool, pool)
        several = f" in {concurrency} {plural}" if concurrency > 1 else ""
        click.echo(f"batchjobs worker: handling {names}{several}; stop with Ctrl-C or SIGTERM", err=True)
    try:
        # SIGHUP (a worker under systemd, a closed terminal) is a request to stop politely, never a crash.
        with stop_on_signals(hangup=True) as stop:
            if concurrency == 1:
                summary = target(registry, engine, jobs=jobs, queues=queues, stop=stop, **options)
            else:
                from batchjobs.workers import run_concurrently

                summary = run_concurrently(
                    registry, engine, concurrency=concurrency, pool=pool, jobs=jobs, queues=queues, stop=stop,
                    target=target, kind=kind, **options,
                )
    except (BatchJobsError, DBAPIError) as error:
        # Rows committed before the error are done: say so, as a run that went well would.
        committed = partial_summary(error)
        if committed is not None and (committed.done or committed.failed or committed.workers_lost):
            report(committed, "run failed")
        unrecorded = unrecorded_end(error)
        if unrecorded is None:
            raise
        # The error that ended the run comes first; _Group would print it only after this line.
        click.echo(f"Error: {error_line(error)}", err=True)
        logging.getLogger("batchjobs").error(unrecorded)
        raise click.exceptions.Exit(1) from None
    if summary.workers_lost:
        click.echo(summary.line())
        raise BatchJobsError(f"{summary.workers_lost} of {concurrency} workers died; their rows are pending again")
    if not (summary.done or summary.failed):
        return
    report(summary)


@main.command("worker")
@click.option("--max-runtime", type=RUN_LIMIT, metavar="DURATION", help="Stop after this long (to recycle the process).")
@click.option("--max-rows", type=click.IntRange(min=1), help="Stop after handling this many rows (to recycle the process).")
@click.option(
    "--poll-interval",
    type=DURATION,
    default="1s",
    show_default=True,
    metavar="DURATION",
    help="How often to look for rows where nothing notifies: SQLite, MySQL, tables without the trigger.",
)
@click.option(
    "--backstop-interval",
    type=DURATION,
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="PostgreSQL with triggers: how often to look anyway (rows past their backoff, a missed notification).",
)
@_run_options
@click.pass_obj
def worker_command(
    state: _State,
    max_runtime: float | None,
    max_rows: int | None,
    poll_interval: float,
    backstop_interval: float,
    queues: tuple[str, ...],
    jobs: tuple[str, ...],
    batch_size: int | None,
    commit_interval: float,
    lock_timeout: float,
    log_format: str,
    verbose: bool,
    concurrency: int,
    pool: str,
) -> None:
    """Handle rows as they become pending, until stopped.

    Drains what is pending, waits, and drains again when woken. On PostgreSQL a
    trigger on each job's table wakes it within milliseconds of the app's COMMIT
    (install it with `batchjobs triggers --apply` or your migrations); elsewhere it
    polls every --poll-interval. Runs safely beside cron runs and other workers.
    SIGTERM, SIGHUP or Ctrl-C finishes the current row, commits and exits 0; a second
    Ctrl-C aborts the chunk in progress (rolled back, its rows pending again) and exits 130.
    """
    from batchjobs.worker import run_worker

    options = dict(
        max_runtime=max_runtime,
        max_rows=max_rows,
        poll_every=poll_interval,
        backstop_every=backstop_interval,
        batch_size=batch_size,
        commit_interval=commit_interval,
        lock_timeout=lock_timeout,
    )
    _drive(state, run_worker, "worker", options, queues, jobs, log_format, verbose, concurrency, pool)


@main.command("triggers")
@click.option("--apply", "apply_", is_flag=True, help="Install them now (CREATE OR REPLACE), instead of printing the SQL.")
@click.option("--drop", is_flag=True, help="Remove them instead (printed, or with --apply, dropped).")
@click.pass_obj
def triggers_command(state: _State, apply_: bool, drop: bool) -> None:
    """The triggers that wake workers when a row becomes pending (PostgreSQL).

    Prints the SQL for every job's table, to put in your migrations (or use
    batchjobs.alembic.add_pending_trigger there); --apply runs it instead.
    """
    from batchjobs.worker import trigger_sql

    registry = state.registry()
    engine = state.engine()
    statements = trigger_sql(registry, engine, drop=drop)
    if not statements:
        click.echo("this database has no notifications: workers poll it (see `batchjobs worker --help`)")
        return
    if not apply_:
        click.echo(";\n\n".join(statements) + ";")
        return
    with connect(engine) as connection, connection.begin():
        for statement in statements:
            connection.exec_driver_sql(statement)
    tables = sorted({job.table.name for job in registry.jobs.values()})
    click.echo(f"pending triggers {'dropped from' if drop else 'installed on'} {', '.join(tables)}")


@main.command("jobs")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def jobs_command(state: _State, as_json: bool) -> None:
    """List registered jobs: name, model, flag column, queue, pending rows."""
    from batchjobs.monitoring import list_jobs

    registry = state.registry()
    with connect(state.engine()) as connection:
        infos = list_jobs(registry, connection)
    if as_json:
        _echo_json([info.as_json() for info in infos])
    else:
        click.echo(
            _table(("NAME", "MODEL", "FLAG", "QUEUE", "PENDING"), [(i.name, i.model, i.flag, i.queue, i.pending) for i in infos])
        )


@main.command("migrate")
@click.pass_obj
def migrate_command(state: _State) -> None:
    """Create or upgrade batchjobs' own tables (its own alembic history; your tables are untouched)."""
    from batchjobs.schema import migrate

    before, after = migrate(state.engine())
    if before == after:
        click.echo(f"batchjobs tables are up to date (revision {after})")
    else:
        click.echo(f"batchjobs tables upgraded from revision {before or '(none)'} to {after}")


@main.command("demo")
@click.option("--database-url", "demo_url", metavar="URL", help="Database for the demo. Default: a SQLite file here.")
@click.option("--signups", type=click.IntRange(min=1), default=300, show_default=True, help="Users to sign up.")
@click.option(
    "--outbox",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("outbox"),
    show_default=True,
    help="Where emails are written when $SMTP_URL is not set.",
)
@click.pass_obj
def demo_command(state: _State, demo_url: str | None, signups: int, outbox: Path) -> None:
    """Run the welcome-email example end to end.

    Uses a SQLite file in the current directory unless --database-url is given
    (before or after `demo`). It creates a `users` table there and signs up
    fake users, so point it at a scratch database, never at your app's.
    Emails go to $SMTP_URL (smtp://host:port) when set, otherwise to .eml
    files in --outbox.
    """
    from batchjobs.demo import APP, DEFAULT_DATABASE_URL, run_demo

    url = demo_url or state.database_url
    report = run_demo(url, signups=signups, outbox=outbox)
    click.echo(f"batchjobs demo on {report.database}")
    click.echo(f"  batchjobs tables at revision {report.revision}")
    click.echo(f"  {report.signups} users signed up; {report.unconfirmed} have not confirmed their email yet")
    click.echo(f"  run-pending: {report.first_run.line()}")
    click.echo(f"  {report.first_run.done} welcome emails delivered to {report.delivered_to}")
    if report.first_run.failed:
        click.echo(
            f"  {report.first_run.failed} deliveries failed and will be retried with backoff: "
            "the `failures` command below lists them"
        )
    click.echo(
        f"  {report.waiting} users wait for their email confirmation (the job's where= filter skips them until then)"
    )
    second = f"  a second run-pending found {report.second_run.done + report.second_run.failed} rows to do: "
    click.echo(second + ("the failed ones wait out their backoff" if report.first_run.failed else "each user is emailed once"))
    click.echo("")
    click.echo("Try the commands cron and operators use:")
    if url is None:
        where = f" --database-url {DEFAULT_DATABASE_URL}"
    else:
        # The URL may hold a password: it is not printed, the commands read it from the environment.
        click.echo("  export BATCHJOBS_DATABASE_URL=...   # the URL you gave the demo")
        where = ""
    # run-pending sends emails too: to the demo's outbox, wherever that was.
    moved = report.outbox is not None and Path(report.outbox) != Path("outbox")
    outbox_env = f"OUTBOX_DIR={shlex.quote(str(report.outbox))} " if moved else ""
    for command in ("status", "failures", "run-pending --max-runtime 55s"):
        prefix = outbox_env if command.startswith("run-pending") else ""
        click.echo(f"  {prefix}batchjobs -A {APP}{where} {command}")


def _age(seconds: float) -> str:
    return format_duration(max(seconds, 0.0))


def _next_attempt(failure: failures_api.FailureInfo, now: datetime) -> str:
    if failure.dead:
        return "dead"
    if failure.next_attempt_at and failure.next_attempt_at > now:
        return f"in {_age((failure.next_attempt_at - now).total_seconds())}"
    return "next run"


@main.command("failures")
@click.argument("job", required=False)
@click.option("--dead", is_flag=True, help="Only dead rows (out of attempts).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def failures_command(state: _State, job: str | None, dead: bool, as_json: bool) -> None:
    """Rows that are failing (waiting to retry) or dead, oldest first."""
    registry = state.registry()
    with state.connect() as connection:
        rows = failures_api.list_failures(registry, connection, job=job, dead_only=dead)
    if as_json:
        _echo_json([row.as_json() for row in rows])
        return
    if not rows:
        click.echo("no dead rows" if dead else "no failing rows")
        return
    now = utcnow()
    click.echo(
        _table(
            ("JOB", "ROW", "ATTEMPTS", "NEXT ATTEMPT", "AGE", "LAST ERROR"),
            [
                (
                    r.job,
                    r.row_key,
                    r.attempts,
                    _next_attempt(r, now),
                    _age((now - r.first_failed_at).total_seconds()),
                    f"{r.error_type}: {r.error_message.splitlines()[0] if r.error_message else ''}"[:100],
                )
                for r in rows
            ],
        )
    )


@main.command("retry")
@click.argument("job")
@click.option("--row", "rows", multiple=True, metavar="KEY", help="Primary key of a failing row (repeatable).")
@click.option("--all-dead", is_flag=True, help="Every dead row of the job.")
@click.option("--all", "everything", is_flag=True, help="Every failing or dead row of the job.")
@click.pass_obj
def retry_command(state: _State, job: str, rows: tuple[str, ...], all_dead: bool, everything: bool) -> None:
    """Clear failure records so the rows are tried again on the next run."""
    if sum((bool(rows), all_dead, everything)) != 1:
        raise BatchJobsError("choose exactly one of --row KEY, --all-dead or --all")
    registry = state.registry()
    count = failures_api.retry(registry, state.engine(), job, row_keys=rows, all_dead=all_dead, everything=everything)
    click.echo(f"{count} row(s) of {job} will be tried again on the next run")


@main.command("show-failure")
@click.argument("job")
@click.argument("key")
@click.pass_obj
def show_failure_command(state: _State, job: str, key: str) -> None:
    """The full last error of one failing row, traceback included."""
    registry = state.registry()
    with state.connect() as connection:
        failure = failures_api.show_failure(registry, connection, job, key)
    if failure.dead:
        state_line = "dead"
    elif failure.next_attempt_at is None:
        state_line = "tried again on the next run"
    else:
        state_line = f"next attempt at {failure.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC"
    crashes = f" ({failure.crashes} ended their worker)" if failure.crashes else ""
    click.echo(f"job {failure.job}, row {failure.row_key}: {failure.attempts} attempt(s){crashes}, {state_line}")
    stamp = "%Y-%m-%d %H:%M:%S"
    click.echo(f"first failed {failure.first_failed_at:{stamp}} UTC, last {failure.last_failed_at:{stamp}} UTC")
    click.echo("")
    click.echo(failure.traceback.rstrip())


@main.command("crontab")
@click.option(
    "--python",
    metavar="PATH",
    help="Python of the virtualenv batchjobs is installed in; runs `PATH -m batchjobs`. "
    "Default: the `batchjobs` command, which must be on cron's PATH.",
)
@click.option(
    "--workdir",
    metavar="DIR",
    default=os.getcwd,
    show_default="the current directory",
    help="Directory each run starts in, so your app imports (-A resolves from there).",
)
@click.option("--log", metavar="FILE", help="Append output to this file instead of having cron mail it.")
@click.option("--format", "fmt", type=click.Choice(["cron", "systemd"]), default="cron", show_default=True)
@click.option("--worker", is_flag=True, help="With --format systemd: an always-running `batchjobs worker` service per queue.")
@click.pass_obj
def crontab_command(state: _State, python: str | None, workdir: str | None, log: str | None, fmt: str, worker: bool) -> None:
    """Print a schedule that runs run-pending for every queue, every minute.

    One crontab line per queue, to paste into `crontab -e`; with --format
    systemd, a .service and a .timer per queue. Nothing is installed. The
    database URL is never printed: set BATCHJOBS_DATABASE_URL in the crontab
    (or in /etc/batchjobs.env for systemd).
    """
    from batchjobs.crontab import render_schedule

    text = render_schedule(state.registry(), state.app or "", python=python, workdir=workdir, log=log, format=fmt, worker=worker)
    click.echo(text, nl=False)


def _selection_options(command: Any) -> Any:
    """The row selection shared by mark-done and requeue."""
    options = [
        click.option("--row", "rows", multiple=True, metavar="KEY", help="Primary key of a row (repeatable)."),
        click.option("--id-range", metavar="FIRST:LAST", help="Primary keys from FIRST to LAST, both included."),
        click.option(
            "--where",
            metavar="SQL",
            help="Raw SQL boolean expression on the job's table, e.g. \"created_at >= :since\". "
            "Use :name placeholders with --param; values are bound, never pasted into the SQL.",
        ),
        click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Value for a :NAME placeholder."),
        click.option("--all", "everything", is_flag=True, help="Every row of the job's table."),
        click.option(
            "--chunk-size", type=click.IntRange(min=1), default=5000, show_default=True, help="Rows per transaction."
        ),
        click.option(
            "--lock-timeout",
            type=DURATION,
            default="5s",
            show_default=True,
            metavar="DURATION",
            help="Give up waiting for a row lock after this long (the chunk is retried, then the command stops).",
        ),
        click.option("--dry-run", is_flag=True, help="Show how many rows would change and some of their keys; change nothing."),
        click.option("--yes", is_flag=True, help=f"Do not ask before changing more than {10_000:,} rows."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _id_range(value: str) -> tuple[str, str]:
    """``A:B`` -> (A, B), both ends included."""
    low, sep, high = value.partition(":")
    if not sep or not low or not high:
        raise BatchJobsError(f"--id-range {value!r}: use FIRST:LAST, e.g. 1000:1999 (both included)")
    return low, high


def _params(values: tuple[str, ...]) -> dict[str, str]:
    """``name=value`` pairs for ``:name`` placeholders in --where."""
    params = {}
    for value in values:
        name, sep, bound = value.partition("=")
        if not sep or not name.isidentifier():
            raise BatchJobsError(f"--param {value!r}: use name=value, for a :name placeholder in --where")
        params[name] = bound
    return params


def _change_rows(state: _State, action: str, job_name: str, opts: dict[str, Any]) -> None:
    from batchjobs.admin import CONFIRM_ABOVE, Selection, change_rows, preview_change
    from batchjobs.progress import Progress

    registry = state.registry()
    job = registry.job(job_name)
    if sum((bool(opts["rows"]), opts["id_range"] is not None, opts["where"] is not None, opts["everything"])) != 1:
        raise BatchJobsError("choose exactly one selection: --row, --id-range, --where or --all")
    selection = Selection(
        keys=opts["rows"],
        id_range=_id_range(opts["id_range"]) if opts["id_range"] else None,
        where=opts["where"],
        params=_params(opts["params"]),
        everything=opts["everything"],
    )
    if opts["params"] and opts["where"] is None:
        raise BatchJobsError("--param only goes with --where")
    engine = state.engine()
    # change_rows() checks this too, but only after the preview and the confirmation prompt.
    ensure_schema(engine)
    verb = "marked done" if action == "mark-done" else "requeued"
    planned = preview_change(registry, engine, job.name, selection, action)
    if opts["dry_run"]:
        if opts["as_json"]:
            _echo_json({"action": action, "job": job.name, "dry_run": True, "rows": planned.rows, "sample": planned.sample})
        else:
            sample = ", ".join(planned.sample) + (", ..." if planned.rows > len(planned.sample) else "")
            first = f"; first keys: {sample}" if sample else ""
            click.echo(f"{action} {job.name} (dry run): {planned.rows:,} rows would be {verb}{first}")
            click.echo("nothing was changed")
        return
    if planned.rows > CONFIRM_ABOVE and not opts["yes"]:
        if sys.stdin is None or not sys.stdin.isatty():
            raise BatchJobsError(f"this would change {planned.rows:,} rows; pass --yes to confirm (no terminal to ask on)")
        click.confirm(f"{action} {job.name}: change {planned.rows:,} rows?", abort=True, err=True)
    progress = Progress(f"{action} {job.name}", planned.rows)
    result = change_rows(
        registry, engine, job.name, selection, action,
        chunk_size=opts["chunk_size"], lock_timeout=opts["lock_timeout"], progress=progress.advance,
    )
    progress.finish()
    if opts["as_json"]:
        _echo_json(
            {
                "action": action,
                "job": job.name,
                "dry_run": False,
                "rows": result.rows,
                "chunks": result.chunks,
                "failures_cleared": result.failures_cleared,
            }
        )
    else:
        cleared = f" ({result.failures_cleared} failure records cleared)" if result.failures_cleared else ""
        click.echo(f"{action} {job.name}: {result.rows:,} rows {verb} in {result.chunks} chunk(s){cleared}")


@main.command("mark-done")
@click.argument("job")
@_selection_options
@click.pass_obj
def mark_done_command(state: _State, /, job: str, **opts: Any) -> None:
    """Set the flag of selected rows to done WITHOUT running the handler.

    For example before enabling a new job on a table whose existing rows must
    not be handled. Works in chunks, one short transaction each, so your app
    keeps writing meanwhile; running it again continues where it stopped.
    """
    _change_rows(state, "mark-done", job, opts)


@main.command("requeue")
@click.argument("job")
@_selection_options
@click.pass_obj
def requeue_command(state: _State, /, job: str, **opts: Any) -> None:
    """Set the flag of selected rows back to pending, so the next run handles them again.

    Also clears their failure records, so dead or backing-off rows are eligible
    at once. Chunked like mark-done.
    """
    _change_rows(state, "requeue", job, opts)


@main.command("backfill")
@click.argument("name")
@click.option("--restart", is_flag=True, help="Start over from the first row instead of resuming.")
@click.option("--throttle", type=DURATION, default="0s", metavar="DURATION", help="Sleep this long between chunks, e.g. 0.2s.")
@click.option(
    "--dry-run", is_flag=True, help="Run the next chunk in a transaction that is rolled back; report what it would change."
)
@click.pass_obj
def backfill_command(state: _State, name: str, restart: bool, throttle: float, dry_run: bool) -> None:
    """Run a backfill defined with @jobs.backfill, resuming where it stopped.

    One transaction per chunk; the position is saved with every committed
    chunk, so after a crash or Ctrl-C the next invocation continues at the
    first chunk that did not commit.
    """
    from batchjobs.backfill import dry_run_backfill, run_backfill
    from batchjobs.progress import Progress
    from batchjobs.signals import stop_on_signals

    registry = state.registry()
    registry.get_backfill(name)
    engine = state.engine()
    if dry_run:
        result = dry_run_backfill(registry, engine, name, restart=restart)
        click.echo(f"backfill {name} (dry run): the next chunk has {result.rows:,} of {result.total:,} remaining rows")
        past = {"insert": "inserted", "update": "updated", "delete": "deleted"}
        for table, kinds in sorted(result.changes.items()):
            click.echo(f"  {table}: " + ", ".join(f"{n:,} rows {past[kind]}" for kind, n in sorted(kinds.items())))
        if not result.changes:
            click.echo("  no rows would change")
        click.echo("nothing was changed (rolled back)")
        return
    progress: Progress | None = None

    def report(rows: int, total: int | None) -> None:
        nonlocal progress
        if progress is None:
            progress = Progress(f"backfill {name}", total)
        progress.advance(rows)

    with stop_on_signals() as stop:
        result = run_backfill(registry, engine, name, restart=restart, throttle=throttle, stop=stop, progress=report)
    if progress is not None:
        progress.finish()
    if result.status == "interrupted":
        click.echo(f"backfill {name}: interrupted after {result.rows:,} rows this run; run it again to resume")
    else:
        click.echo(f"backfill {name}: finished, {result.rows:,} rows in {result.chunks} chunk(s) this run")


@main.command("backfills")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def backfills_command(state: _State, as_json: bool) -> None:
    """List backfills: status, rows done, cursor, when started and finished, last error."""
    from batchjobs.backfill import list_backfills

    registry = state.registry()
    with state.connect() as connection:
        infos = list_backfills(registry, connection)
    if as_json:
        _echo_json([info.as_json() for info in infos])
        return
    if not infos:
        click.echo("no backfills defined")
        return
    click.echo(
        _table(
            ("NAME", "STATUS", "ROWS", "CURSOR", "STARTED", "FINISHED", "LAST ERROR"),
            [
                (
                    i.name + ("" if i.registered else " (not in app)"),
                    i.status,
                    f"{i.rows_done:,}" + (f"/{i.total:,}" if i.total is not None else ""),
                    i.cursor or "-",
                    (i.started_at or "-")[:19],
                    (i.finished_at or "-")[:19],
                    (i.last_error or "").splitlines()[0][:80] if i.last_error else "",
                )
                for i in infos
            ],
        )
    )


def _age_text(seconds: float | None) -> str:
    return "-" if seconds is None else _age(seconds)


@main.command("status")
@click.option("-q", "--queue", "queues", multiple=True, metavar="QUEUE", help="Only jobs of this queue (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def status_command(state: _State, queues: tuple[str, ...], as_json: bool) -> None:
    """Per job: pending rows, oldest pending age, backing off, dead, done in the last hour.

    Below the table: the last run (when, where, how it ended) and the runs alive now.
    Oldest pending age needs pending_since= on the job.
    """
    from batchjobs.monitoring import RunInfo, status

    registry = state.registry()
    with state.connect() as connection:
        current = status(registry, connection, queues=queues)
    if as_json:
        _echo_json(current.as_json())
        return
    click.echo(
        _table(
            ("JOB", "QUEUE", "PENDING", "OLDEST", "BACKOFF", "DEAD", "DONE 1H"),
            [
                (j.name, j.queue, j.pending, _age_text(j.oldest_pending_age), j.backoff, j.dead, j.done_last_hour)
                for j in current.jobs
            ],
        )
    )
    click.echo("")
    now = utcnow()
    if current.last_run is None:
        click.echo("last run: none recorded yet")
    else:
        run = current.last_run
        took = "so far (counts refresh every few seconds)" if run.outcome == "running" else f"in {format_duration(run.seconds)}"
        click.echo(
            f"last run: started {_age((now - run.started_at).total_seconds())} ago on {run.host} (pid {run.pid}), "
            f"{run.outcome}, {run.rows_done} done, {run.rows_failed} failed {took}"
        )
    def live(run: RunInfo) -> str:
        what = f"worker{' (' + ','.join(run.queues) + ')' if run.queues else ''}" if run.kind == "worker" else "run"
        return f"{what} on {run.host} pid {run.pid} for {_age((now - run.started_at).total_seconds())}, {run.rows_done} done"

    click.echo(f"running now: {', '.join(live(run) for run in current.alive) or 'none'}")


class _CheckCommand(click.Command):
    """Nagios convention: anything that stops the check itself is UNKNOWN (exit 3), even bad usage."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            click.echo(f"BATCHJOBS UNKNOWN - {exc.format_message()}")
            raise click.exceptions.Exit(3) from None


@main.command("check", cls=_CheckCommand)
@click.option("--job", "jobs", multiple=True, metavar="NAME", help="Only this job (repeatable). Default: all.")
@click.option("--max-pending", metavar="[WARN,]CRIT", help="Pending rows per job.")
@click.option(
    "--max-pending-age", metavar="[WARN,]CRIT", help="Age of the oldest pending row, e.g. 5m,10m (needs pending_since=)."
)
@click.option("--max-dead", metavar="[WARN,]CRIT", help="Dead rows per job, e.g. 0 for none at all.")
@click.option("--max-since-last-run", metavar="[WARN,]CRIT", help="Time since the last run started, e.g. 2m,5m.")
@click.option("--min-workers", type=click.IntRange(min=1), metavar="N", help="Fewer live `batchjobs worker`s than N is CRITICAL.")
@click.option("--queue", metavar="QUEUE", help="With --min-workers: count only workers serving this queue.")
@click.pass_obj
def check_command(
    state: _State,
    jobs: tuple[str, ...],
    max_pending: str | None,
    max_pending_age: str | None,
    max_dead: str | None,
    max_since_last_run: str | None,
    min_workers: int | None,
    queue: str | None,
) -> None:
    """Health check for Nagios, Icinga, Consul and friends.

    Prints one line with performance data after '|' and exits 0 OK, 1 WARNING,
    2 CRITICAL, or 3 UNKNOWN (e.g. the database cannot be reached). Each limit is
    CRIT or WARN,CRIT; a value above it raises the state.
    """
    from batchjobs.check import NO_LIMIT, UNKNOWN, Threshold, run_check

    def limit(text: str | None, option: str, duration: bool = False) -> Threshold:
        return Threshold.parse(text, option, duration) if text is not None else NO_LIMIT

    try:
        if queue is not None and min_workers is None:
            raise BatchJobsError("--queue only counts workers: give it with --min-workers")
        thresholds: dict[str, Any] = {
            "max_pending": limit(max_pending, "--max-pending"),
            "max_pending_age": limit(max_pending_age, "--max-pending-age", duration=True),
            "max_dead": limit(max_dead, "--max-dead"),
            "max_since_last_run": limit(max_since_last_run, "--max-since-last-run", duration=True),
        }
        registry = state.registry()
        # Nagios kills a plugin after 10 s, and a killed plugin tells nobody why; an unreachable
        # database must be reported as UNKNOWN well before that (unless the URL sets its own).
        with state.connect(connect_timeout=3) as connection:
            result = run_check(registry, connection, jobs=jobs, min_workers=min_workers, queue=queue, **thresholds)
    except BatchJobsError as exc:
        click.echo(f"BATCHJOBS UNKNOWN - {exc}")
        raise click.exceptions.Exit(UNKNOWN) from None
    except DBAPIError as exc:
        click.echo(f"BATCHJOBS UNKNOWN - database error: {first_line(exc)}")
        raise click.exceptions.Exit(UNKNOWN) from None
    click.echo(result.line())
    raise click.exceptions.Exit(result.code)


@main.command("metrics")
@click.option(
    "--textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file atomically, for node_exporter's textfile collector, instead of printing.",
)
@click.pass_obj
def metrics_command(state: _State, textfile: Path | None) -> None:
    """Prometheus metrics per job: pending, oldest pending age, backoff, dead, last run.

    Needs prometheus_client: pip install 'batchjobs[metrics]'.
    """
    from batchjobs.metrics import collect, render, write_textfile

    registry = state.registry()
    with state.connect() as connection:
        metrics = collect(registry, connection)
    if textfile is None:
        click.echo(render(metrics), nl=False)
    else:
        write_textfile(metrics, textfile)


@main.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; beyond the loopback, needs --auth.")
@click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True, help="Port (0: any free one).")
@click.option(
    "--auth",
    metavar="USER:PASSWORD",
    envvar="BATCHJOBS_WEB_AUTH",
    help="Ask for this user name and password (HTTP Basic). Or $BATCHJOBS_WEB_AUTH, which keeps it out of `ps`.",
)
@click.option("--read-only", is_flag=True, help="Show no buttons and refuse every change.")
@click.pass_obj
def web_command(state: _State, host: str, port: int, auth: str | None, read_only: bool) -> None:
    """Serve the web page: queues, backlogs over 24 hours, failures with tracebacks, retry.

    Binds 127.0.0.1 by default; to listen elsewhere, give a password. Behind TLS and your own login,
    mount `batchjobs.web.create_app(...)` in your app instead. Every change is logged to stderr with
    who made it. Needs: pip install 'batchjobs[web]'.
    """
    import logging
    import signal

    try:
        from batchjobs.web import create_app
        from batchjobs.web.security import check_bind, parse_auth
        from batchjobs.web.serve import serve
    except ImportError as exc:
        raise BatchJobsError(f"the web page needs {exc.name}: pip install 'batchjobs[web]'") from None

    credentials = parse_auth(auth) if auth else None
    check_bind(host, credentials)
    registry = state.registry()
    engine = state.engine()
    with connect(engine) as connection:
        check_schema(connection)  # one clear line now, rather than an error page later
    app = create_app(registry, engine, read_only=read_only, auth=credentials)
    logging.getLogger("batchjobs.web").setLevel(logging.INFO)

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    mode = ("password" if credentials else "no password") + (", read-only" if read_only else "")

    def ready(url: str) -> None:
        click.echo(f"batchjobs web page at {url} ({mode}; Ctrl-C stops it)")

    try:
        serve(app, host, port, ready=ready)
    except OSError as exc:
        raise BatchJobsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass

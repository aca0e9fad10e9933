"""`batchjobs crontab`: the schedule that runs each queue of a registry every minute.

The schedule is printed, never installed: ops paste it into ``crontab -e`` or split it into
systemd unit files, so what runs in production stays plain, reviewable text.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass

from batchjobs.errors import BatchJobsError
from batchjobs.registry import Registry
from batchjobs.text import table_lines
from batchjobs.timeutil import parse_duration

FORMATS = ("cron", "systemd")
DEFAULT_DATABASE_URL_ENV = "BATCHJOBS_DATABASE_URL"
# batchjobs reads these itself (see db.resolve_database_url); any other name is passed explicitly.
_READ_BY_BATCHJOBS = ("BATCHJOBS_DATABASE_URL", "DATABASE_URL")
ENV_FILE = "/etc/batchjobs.env"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Characters systemd accepts in a unit name, so a queue can name its own unit.
_UNIT_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
# ExecStart words that need no quoting; anything else is double-quoted.
_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def render_schedule(
    registry: Registry,
    app: str,
    *,
    python: str | None = None,
    workdir: str | None = None,
    log: str | None = None,
    database_url_env: str | None = None,
    format: str = "cron",
    max_runtime: str = "55s",
    worker: bool = False,
) -> str:
    """The text that runs ``run-pending`` once a minute for every queue of ``registry``.

    ``app`` is the ``module:attribute`` spec of the registry, as given to ``-A``. ``python`` is
    the interpreter to run ``-m batchjobs`` with (a virtualenv's python, typically); without it
    the ``batchjobs`` console script must be on the scheduler's PATH. ``workdir`` is where each
    run starts, so the app's own package imports; ``log`` is a file that collects the output,
    which cron otherwise mails. Relative paths are made absolute, since cron starts in $HOME.

    ``database_url_env`` names the environment variable holding the database URL (default
    ``BATCHJOBS_DATABASE_URL``). The URL itself is never printed: it may contain a password.

    ``format`` is ``"cron"`` (one crontab line per queue) or ``"systemd"`` (a service and a timer
    per queue, separated by ``# ---- file: NAME ----`` lines). With ``worker`` (systemd only), a
    service per queue runs `batchjobs worker` instead, restarted whenever it ends. systemd needs
    an absolute command: without ``python`` it runs ``-m batchjobs`` with this Python.

    Raises :class:`BatchJobsError` for an unknown format, a registry without jobs, or values that
    cannot be written safely.
    """
    if format not in FORMATS:
        raise BatchJobsError(f"unknown schedule format {format!r} (use one of: {', '.join(FORMATS)})")
    if worker and format != "systemd":
        raise BatchJobsError("a worker is a long-running service: use the systemd format for it")
    if not registry.jobs:
        raise BatchJobsError(f"{app} has no jobs registered, so there is nothing to schedule")
    parse_duration(max_runtime)  # a typo fails here, not in every run at 3 a.m.
    env_name = database_url_env or DEFAULT_DATABASE_URL_ENV
    if not _ENV_NAME.fullmatch(env_name):
        raise BatchJobsError(f"{env_name!r} is not an environment variable name")
    for value in (app, python, workdir, log, max_runtime, *registry.queues):
        # A newline would end the crontab entry (or unit setting) in the middle of a command.
        if value is not None and ("\n" in value or "\r" in value):
            raise BatchJobsError(f"{value!r} contains a line break and cannot go into a schedule")
    if python is not None and os.sep in python:
        python = os.path.abspath(python)
    workdir = os.path.abspath(workdir) if workdir else None
    log = os.path.abspath(log) if log else None
    if format == "systemd" and python is None:
        python = sys.executable  # systemd refuses a command that is not an absolute path
    schedule = _Schedule(registry, app, python, workdir, log, env_name, max_runtime, worker)
    return schedule.cron() if format == "cron" else schedule.systemd()


@dataclass(frozen=True)
class _Schedule:
    registry: Registry
    app: str
    python: str | None
    workdir: str | None
    log: str | None
    env_name: str
    max_runtime: str
    worker: bool = False

    def _program(self) -> list[str]:
        return [self.python, "-m", "batchjobs"] if self.python else ["batchjobs"]

    def _arguments(self, queue: str) -> list[str]:
        if self.worker:
            return ["worker", "--queue", queue]
        return ["run-pending", "--queue", queue, "--max-runtime", self.max_runtime]

    def _jobs_table(self) -> list[str]:
        rows = [
            (job.queue, job.name, job.model.__name__, f"{job.table.name}.{job.flag.name}")
            for queue in self.registry.queues
            for job in self.registry.jobs.values()
            if job.queue == queue
        ]
        return ["#   " + line for line in table_lines(("QUEUE", "JOB", "MODEL", "FLAG"), rows)]

    def _path_note(self) -> list[str]:
        if self.python:
            return []
        return [
            "# `batchjobs` must be on the scheduler's PATH (cron's is often just /usr/bin:/bin);",
            "# otherwise generate this again with the full path of your virtualenv's python.",
        ]

    # -- cron -----------------------------------------------------------------------------

    def cron_line(self, queue: str) -> str:
        words = [shlex.quote(word) for word in self._program() + ["-A", self.app]]
        if self.env_name not in _READ_BY_BATCHJOBS:
            # Double quotes, not shlex.quote: the shell must expand the variable at run time.
            words += ["--database-url", f'"${self.env_name}"']
        words += [shlex.quote(word) for word in self._arguments(queue)]
        command = " ".join(words)
        if self.workdir:
            # load_registry imports the app from the current directory, as `-A` does in Celery.
            command = f"cd {shlex.quote(self.workdir)} && {command}"
        if self.log:
            command += f" >> {shlex.quote(self.log)} 2>&1"
        # cron turns an unescaped % into a newline (the rest becomes stdin); \% passes a plain %.
        return "* * * * * " + command.replace("%", "\\%")

    def cron(self) -> str:
        lines = [
            f"# batchjobs schedule for -A {self.app}: run-pending for each queue, every minute.",
            "# Install with `crontab -e` as the user your app runs as.",
            "#",
            "# Jobs per queue:",
            *self._jobs_table(),
            "#",
            f"# {self.env_name} must be set in this crontab: cron does not read your shell profile.",
            "# Uncomment and edit the next line; cron takes the value literally (no $VARS).",
            f"# {self.env_name}=postgresql://user@host/db",
            "#",
            f"# --max-runtime {self.max_runtime} ends a run before the next minute's starts. Runs that",
            "# overlap anyway are safe: rows are claimed with SKIP LOCKED, so none is done twice.",
            *self._path_note(),
        ]
        lines += [self.cron_line(queue) for queue in self.registry.queues]
        return "\n".join(lines) + "\n"

    # -- systemd --------------------------------------------------------------------------

    def exec_start(self, queue: str) -> str:
        words = [_systemd_word(word) for word in self._program() + ["-A", self.app]]
        if self.env_name not in _READ_BY_BATCHJOBS:
            # systemd expands ${NAME} from the environment file, as one argument.
            words += ["--database-url", f"${{{self.env_name}}}"]
        words += [_systemd_word(word) for word in self._arguments(queue)]
        return " ".join(words)

    def service(self, queue: str) -> list[str]:
        what = "worker" if self.worker else "run-pending"
        lines = [
            "[Unit]",
            f"Description=batchjobs {what}, queue {_specifiers(queue)} of {_specifiers(self.app)}",
            *(["After=network-online.target", "Wants=network-online.target"] if self.worker else []),
            "",
            "[Service]",
            *(
                [
                    "Type=simple",
                    "# A worker that ends for any reason is started again; a crash pill is set apart by the",
                    "# next start (see `batchjobs failures`), so restarts do not repeat it forever.",
                    "Restart=always",
                    "RestartSec=2",
                    "# SIGTERM: finish the current row, commit, exit.",
                    "KillSignal=SIGTERM",
                    "TimeoutStopSec=60",
                ]
                if self.worker
                else ["Type=oneshot"]
            ),
            "# Run as your app's user rather than root:",
            "#User=app",
        ]
        if self.workdir:
            lines.append(f"WorkingDirectory={_specifiers(self.workdir)}")
        lines += [
            f"# {ENV_FILE} holds {self.env_name}=postgresql://user@host/db (keep it mode 600).",
            f"EnvironmentFile=-{ENV_FILE}",
            f"ExecStart={self.exec_start(queue)}",
        ]
        if self.log:
            # stderr on the same descriptor, like `>> LOG 2>&1` in the crontab: said, not left to
            # the manager's DefaultStandardError, which a host may have set to the journal.
            lines += [f"StandardOutput=append:{_specifiers(self.log)}", "StandardError=inherit"]
        return lines

    @staticmethod
    def timer(queue: str) -> list[str]:
        return [
            "[Unit]",
            f"Description=Run batchjobs-{queue}.service every minute",
            "",
            "[Timer]",
            "OnCalendar=minutely",
            "AccuracySec=1s",
            "# A missed minute needs no catch-up run: the next run drains the backlog.",
            "Persistent=false",
            "",
            "[Install]",
            "WantedBy=timers.target",
        ]

    def systemd(self) -> str:
        queues = self.registry.queues
        for queue in queues:
            if not _UNIT_NAME.fullmatch(queue):
                raise BatchJobsError(
                    f"queue {queue!r} cannot be part of a systemd unit name; rename it or use the cron format"
                )
        if self.worker:
            what = "a worker for each queue, always running."
            enable = [f"batchjobs-worker-{queue}.service" for queue in queues]
            notes = [
                "# On PostgreSQL install the pending triggers first (`batchjobs triggers --apply`), so a",
                "# worker wakes within milliseconds; keep the cron schedule too, as the backstop for a",
                "# worker that is down: runs and workers claim with SKIP LOCKED, never the same row.",
            ]
        else:
            what = "run-pending for each queue, every minute."
            enable = [f"batchjobs-{queue}.timer" for queue in queues]
            notes = ["# A timer never starts its service while the previous run is still going.", *self._path_note()]
        lines = [
            f"# batchjobs systemd units for -A {self.app}: {what}",
            "#",
            "# Jobs per queue:",
            *self._jobs_table(),
            "#",
            "# Save this text as batchjobs.units and split it at the '# ---- file: NAME ----' lines:",
            "#   awk '/^# ---- file: /{f=\"/etc/systemd/system/\"$4; next} f{print > f}' batchjobs.units",
            "# then install:",
            "#   systemctl daemon-reload",
            f"#   systemctl enable --now {' '.join(enable)}",
            "#",
            f"# Put {self.env_name}=postgresql://user@host/db in {ENV_FILE} (mode 600).",
            *notes,
        ]
        for queue in queues:
            if self.worker:
                lines += ["", f"# ---- file: batchjobs-worker-{queue}.service ----", *self.service(queue)]
                lines += ["", "[Install]", "WantedBy=multi-user.target"]
            else:
                lines += ["", f"# ---- file: batchjobs-{queue}.service ----", *self.service(queue)]
                lines += ["", f"# ---- file: batchjobs-{queue}.timer ----", *self.timer(queue)]
        return "\n".join(lines) + "\n"


def _specifiers(value: str) -> str:
    """Escape systemd's %-specifiers, so a literal % in a path or name stays a %."""
    return value.replace("%", "%%")


def _systemd_word(word: str) -> str:
    """One ExecStart argument. systemd splits on whitespace and honours quotes around a whole
    word only, so shlex.quote's 'a'"'"'b' form does not work there; this double-quotes instead."""
    word = _specifiers(word).replace("$", "$$")
    if _SYSTEMD_PLAIN.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'

"""The web page as a WSGI application: overview, a job's failures, a traceback, run history, and the
writes (retry, requeue, mark done), each behind a confirmation.

Every page is a call of batchjobs' Python API; this module parses requests and renders the answers,
it builds no SQL. Writes are POSTs with a CSRF token, are refused when read-only, and are logged on
the ``batchjobs.web`` logger with who made them.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, NotFound
from werkzeug.routing import Map, MapAdapter, Rule
from werkzeug.wrappers import Request, Response

from batchjobs.admin import ACTIONS, Selection, change_rows, preview_change
from batchjobs.db import check_schema, connect, first_line
from batchjobs.errors import BatchJobsError
from batchjobs.failures import list_failures, retry, show_failure
from batchjobs.monitoring import JobStatus, last_run, run_history, status
from batchjobs.registry import FlagJob, Registry, parse_key
from batchjobs.timeutil import format_duration, utcnow
from batchjobs.web.charts import day_chart
from batchjobs.web.security import CSRF_COOKIE, CSRF_FIELD, basic_auth_user, csrf_ok, csrf_token

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

logger = logging.getLogger("batchjobs.web")

#: Rows per page of failures and runs.
PAGE_SIZE = 50
#: Page numbers above this are refused: a page that far would only make the database skip rows.
MAX_PAGE = 10_000
#: Failure records key rows by text of at most this many characters.
MAX_KEY = 255
#: Integer keys beyond a 64-bit integer cannot name a row; refused before the database sees them.
_INT64 = 2**63
#: Where a confirmed write sends the browser back, and what the page then says.
DONE_MESSAGES = {
    "retried": "{rows} row(s) will be tried again on the next run.",
    "requeue": "{rows} row(s) requeued: pending again.",
    "mark-done": "{rows} row(s) marked done without running the handler.",
}
_SECURITY_HEADERS = {
    # uPlot sizes its elements through style attributes; scripts and everything else come from here only.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

#: Who makes a request, as the mounting app knows it (its logged-in user), from the WSGI environ.
UserOf = Callable[["WSGIEnvironment"], "str | None"]


@dataclass(frozen=True)
class _Unauthorized(Exception):
    realm: str


class WebApp:
    """The WSGI application; see :func:`batchjobs.web.create_app`."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        *,
        read_only: bool = False,
        user: UserOf | None = None,
        auth: tuple[str, str] | None = None,
        refresh: int = 10,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.read_only = read_only
        self.user = user
        self.auth = auth
        self.refresh = refresh
        self.url_map = Map(
            [
                Rule("/", endpoint="overview", methods=["GET"]),
                Rule("/runs", endpoint="runs", methods=["GET"]),
                Rule("/jobs/<job>", endpoint="job", methods=["GET"]),
                Rule("/jobs/<job>/failure", endpoint="failure", methods=["GET"]),
                Rule("/jobs/<job>/retry", endpoint="retry", methods=["POST"]),
                Rule("/jobs/<job>/change", endpoint="change", methods=["POST"]),
                Rule("/static/<name>", endpoint="static", methods=["GET"]),
            ],
            strict_slashes=False,
        )
        self.templates = Environment(
            loader=PackageLoader("batchjobs.web", "templates"),
            autoescape=select_autoescape(default=True),
            undefined=StrictUndefined,
        )
        self.templates.filters["age"] = _age
        self.templates.filters["when"] = _when
        static = files("batchjobs.web") / "static"
        self.static = {item.name: item.read_bytes() for item in static.iterdir() if item.is_file()}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        # Forms here are a few short fields; anything bigger is not one of ours.
        request.max_content_length = 64 * 1024
        request.max_form_memory_size = 64 * 1024
        return self.handle(request)(environ, start_response)

    # -- dispatch ---------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        adapter = self.url_map.bind_to_environ(request.environ)
        try:
            endpoint, args = adapter.match()
            if endpoint == "static":
                return self._static(request, **args)
            self._authenticate(request)
            if request.method == "POST":
                self._check_write(request)
            view: Callable[..., Response] = getattr(self, f"_{endpoint}")
            return view(request, adapter, **args)
        except _Unauthorized as exc:
            response = self._error(request, adapter, 401, "A user name and password are needed.")
            response.headers["WWW-Authenticate"] = f'Basic realm="{exc.realm}", charset="UTF-8"'
            return response
        except HTTPException as exc:
            if exc.code is not None and 300 <= exc.code < 400:  # a routing redirect
                return exc.get_response(request.environ)
            return self._error(request, adapter, exc.code or 500, exc.description or exc.name)
        except BatchJobsError as exc:
            # Cannot connect, or batchjobs' tables are not migrated: the operator's to fix.
            return self._error(request, adapter, 503, str(exc))
        except DBAPIError as exc:
            logger.error("database error on %s %s: %s", request.method, request.path, first_line(exc, self.engine.url))
            return self._error(request, adapter, 503, "The database answered with an error; the server's log says which.")
        except Exception:
            logger.exception("error on %s %s", request.method, request.path)
            return self._error(request, adapter, 500, "Something went wrong; the server's log has the details.")

    def _authenticate(self, request: Request) -> None:
        if self.auth is None:
            return
        name = basic_auth_user(request, self.auth)
        if name is None:
            raise _Unauthorized("batchjobs")
        request.environ["batchjobs.web.user"] = name

    def _check_write(self, request: Request) -> None:
        if self.read_only:
            raise Forbidden("This page is read-only: nothing can be changed from it.")
        if not csrf_ok(request):
            raise Forbidden("The form was not sent from this page (its security token is missing or wrong): reload, try again.")

    def who(self, request: Request) -> str:
        """Who a write is logged as: the mounting app's user, the Basic auth user, or REMOTE_USER."""
        name = self.user(request.environ) if self.user is not None else None
        name = name or request.environ.get("batchjobs.web.user") or request.remote_user or "anonymous"
        return f"{name} ({request.remote_addr or 'unknown address'})"

    # -- pages ------------------------------------------------------------------------------------------

    def _overview(self, request: Request, adapter: MapAdapter) -> Response:
        now = utcnow()
        with self._reading() as connection:
            current = status(self.registry, connection, now=now)
            chart = day_chart(connection, [job.name for job in current.jobs], now)
            last = {job.name: last_run(self.registry, connection, job.name, now) for job in current.jobs}
        return self._render(
            request, adapter, "overview.html", status=current, last=last, chart=chart.as_json(), now=now, refresh=self.refresh
        )

    def _job(self, request: Request, adapter: MapAdapter, job: str) -> Response:
        flag_job = self._job_or_404(job)
        page = _page(request)
        dead_only = request.args.get("dead", "") == "1"
        now = utcnow()
        with self._reading() as connection:
            info = _status_of(self.registry, connection, flag_job, now)
            rows = list_failures(
                self.registry, connection, job, dead_only, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE
            )
            chart = day_chart(connection, [job], now)
            last = last_run(self.registry, connection, job, now)
        return self._render(
            request,
            adapter,
            "job.html",
            job=flag_job,
            info=info,
            failures=rows[:PAGE_SIZE],
            page=page,
            has_next=len(rows) > PAGE_SIZE,
            dead_only=dead_only,
            last=last,
            chart=chart.as_json(),
            now=now,
            done_message=_done_message(request),
            actions=ACTIONS,
        )

    def _failure(self, request: Request, adapter: MapAdapter, job: str) -> Response:
        flag_job = self._job_or_404(job)
        key = _key_text(request.args.get("key"))
        with self._reading() as connection:
            try:
                failure = show_failure(self.registry, connection, flag_job.name, key)
            except BatchJobsError as exc:
                raise NotFound(str(exc)) from None
        return self._render(request, adapter, "failure.html", job=flag_job, failure=failure, now=utcnow())

    def _runs(self, request: Request, adapter: MapAdapter) -> Response:
        page = _page(request)
        with self._reading() as connection:
            runs, total = run_history(self.registry, connection, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        return self._render(
            request, adapter, "runs.html", runs=runs, page=page, has_next=page * PAGE_SIZE < total, total=total
        )

    # -- writes -----------------------------------------------------------------------------------------

    def _retry(self, request: Request, adapter: MapAdapter, job: str) -> Response:
        flag_job = self._job_or_404(job)
        all_dead = request.form.get("all_dead", "") == "1"
        key = None if all_dead else _key_text(request.form.get("key"))
        if not _confirmed(request):
            with self._reading() as connection:
                if key is not None:
                    try:
                        show_failure(self.registry, connection, job, key)
                    except BatchJobsError as exc:
                        raise NotFound(str(exc)) from None
                    rows, sample = 1, [key]
                else:
                    info = _status_of(self.registry, connection, flag_job, utcnow())
                    dead = list_failures(self.registry, connection, job, dead_only=True, limit=10)
                    rows, sample = info.dead, [f.row_key for f in dead]
            what = f"Retry row {key}" if key is not None else "Retry every dead row"
            fields = {"key": key} if key is not None else {"all_dead": "1"}
            return self._confirm(request, adapter, flag_job, "retry", what, rows, sample, fields)
        try:
            cleared = retry(self.registry, self.engine, job, row_keys=[key] if key is not None else (), all_dead=all_dead)
        except BatchJobsError as exc:
            raise BadRequest(str(exc)) from None
        selection = f"row {key!r}" if key is not None else "all dead rows"
        logger.info("%s: retry %s of job %s: %d row(s) cleared", self.who(request), selection, job, cleared)
        return self._back_to_job(adapter, job, "retried", cleared)

    def _change(self, request: Request, adapter: MapAdapter, job: str) -> Response:
        flag_job = self._job_or_404(job)
        action = request.form.get("action", "")
        if action not in ACTIONS:
            raise BadRequest(f"unknown action; use one of: {', '.join(ACTIONS)}")
        low, high = (_key_text(request.form.get(end)) for end in ("low", "high"))
        for end in (low, high):
            _check_key(flag_job, end)
        selection = Selection(id_range=(low, high))
        if not _confirmed(request):
            try:
                preview = preview_change(self.registry, self.engine, job, selection, action)
            except BatchJobsError as exc:
                raise BadRequest(str(exc)) from None
            verb = "Requeue" if action == "requeue" else "Mark done"
            what = f"{verb} the rows with keys from {low} to {high}"
            fields = {"action": action, "low": low, "high": high}
            return self._confirm(request, adapter, flag_job, "change", what, preview.rows, preview.sample, fields)
        try:
            result = change_rows(self.registry, self.engine, job, selection, action)
        except BatchJobsError as exc:
            raise BadRequest(str(exc)) from None
        logger.info(
            "%s: %s keys %r to %r of job %s: %d row(s) changed, %d failure record(s) cleared",
            self.who(request),
            action,
            low,
            high,
            job,
            result.rows,
            result.failures_cleared,
        )
        return self._back_to_job(adapter, job, action, result.rows)

    def _confirm(
        self,
        request: Request,
        adapter: MapAdapter,
        job: FlagJob,
        endpoint: str,
        what: str,
        rows: int,
        sample: list[str],
        fields: dict[str, str],
    ) -> Response:
        return self._render(
            request,
            adapter,
            "confirm.html",
            job=job,
            action_url=adapter.build(endpoint, {"job": job.name}),
            what=what,
            rows=rows,
            sample=sample,
            fields=fields,
        )

    def _back_to_job(self, adapter: MapAdapter, job: str, done: str, rows: int) -> Response:
        # See-other: reloading the page that follows does not send the write again.
        response = Response(status=303)
        response.headers["Location"] = adapter.build("job", {"job": job, "done": done, "rows": rows})
        return response

    # -- plumbing ---------------------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """One connection for everything a page reads, on a database whose batchjobs tables are current."""
        with connect(self.engine) as connection:
            check_schema(connection)
            yield connection

    def _job_or_404(self, name: str) -> FlagJob:
        job = self.registry.jobs.get(name)
        if job is None:
            raise NotFound("There is no job of that name.")
        return job

    def _static(self, request: Request, name: str) -> Response:
        content = self.static.get(name)
        if content is None:
            raise NotFound()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.endswith(".LICENSE"):
            kind = "text/plain"
        response = Response(content, mimetype=kind)
        response.headers["Cache-Control"] = "public, max-age=3600"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def _render(self, request: Request, adapter: MapAdapter, template: str, code: int = 200, **context: Any) -> Response:
        token, new = csrf_token(request)

        def url_for(endpoint: str, **values: Any) -> str:
            return adapter.build(endpoint, values)

        html = self.templates.get_template(template).render(
            url_for=url_for, csrf_field=CSRF_FIELD, csrf_token=token, read_only=self.read_only, **context
        )
        response = Response(html, status=code, mimetype="text/html")
        for header, value in _SECURITY_HEADERS.items():
            response.headers[header] = value
        response.headers["Cache-Control"] = "no-store"
        if new:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                httponly=True,
                samesite="Strict",
                secure=request.scheme == "https",
                path=(request.script_root or "") + "/",
            )
        return response

    def _error(self, request: Request, adapter: MapAdapter, code: int, message: str) -> Response:
        try:
            return self._render(request, adapter, "error.html", code=code, status_code=code, message=message)
        except Exception:
            logger.exception("error page for %s %s", request.method, request.path)
            return Response(f"{code}: {message}", status=code, mimetype="text/plain")


def _status_of(registry: Registry, connection: Connection, job: FlagJob, now: datetime) -> JobStatus:
    [found] = [item for item in status(registry, connection, queues=[job.queue], now=now).jobs if item.name == job.name]
    return found


def _page(request: Request) -> int:
    raw = request.args.get("page", "1")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_PAGE:
        raise BadRequest(f"page must be a number from 1 to {MAX_PAGE}")
    return int(raw)


def _key_text(value: str | None) -> str:
    """A row key as typed or sent: present, printable, and no longer than a failure record holds."""
    if value is None or value == "":
        raise BadRequest("a row key is needed")
    if len(value) > MAX_KEY or not value.isprintable():
        raise BadRequest(f"a row key is printable text of at most {MAX_KEY} characters")
    return value


def _check_key(job: FlagJob, text: str) -> None:
    """That ``text`` is a valid value of the job's primary key (so the database never sees a bad one)."""
    try:
        value = parse_key(job.primary_key, text)
    except BatchJobsError as exc:
        raise BadRequest(str(exc)) from None
    if isinstance(value, int) and not -_INT64 <= value < _INT64:
        raise BadRequest(f"{text!r} is out of range for {job.table.name}.{job.primary_key.name}")


def _confirmed(request: Request) -> bool:
    return request.form.get("confirmed", "") == "1"


def _done_message(request: Request) -> str | None:
    template = DONE_MESSAGES.get(request.args.get("done", ""))
    rows = request.args.get("rows", "")
    if template is None or not (rows.isascii() and rows.isdigit() and len(rows) <= 12):
        return None
    return template.format(rows=int(rows))


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _when(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "-"
    text = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    if now is not None:
        text += f" ({format_duration(max((now - moment).total_seconds(), 0.0))} ago)"
    return text

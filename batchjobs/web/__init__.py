"""A web page for batchjobs: queues and backlogs over 24 hours, failures with their tracebacks,
retry with a click. Install with ``pip install 'batchjobs[web]'``.

:func:`create_app` gives a WSGI application to mount in your own app, under its URL prefix and
behind its login; ``batchjobs web`` serves it alone (see :func:`batchjobs.web.serve.serve`).
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from batchjobs.db import create_engine
from batchjobs.errors import BatchJobsError
from batchjobs.registry import Registry
from batchjobs.web.app import UserOf, WebApp


def create_app(
    registry: Registry,
    engine_or_url: Engine | str | URL,
    *,
    read_only: bool = False,
    user: UserOf | None = None,
    auth: tuple[str, str] | None = None,
    refresh: int = 10,
) -> WebApp:
    """The web page as a WSGI application, for ``registry``'s jobs on this database.

    ``read_only`` shows no buttons and refuses every write. ``user(environ)`` names who makes a
    request (your app's logged-in user), for the log line every write leaves on the
    ``batchjobs.web`` logger. ``auth=(user, password)`` asks for HTTP Basic credentials; leave it
    out when your app's own login is in front. The overview reloads every ``refresh`` seconds
    (0: never).
    """
    if refresh < 0:
        raise BatchJobsError(f"refresh must be 0 (never) or more seconds, got {refresh}")
    engine = engine_or_url if isinstance(engine_or_url, Engine) else create_engine(engine_or_url)
    return WebApp(registry, engine, read_only=read_only, user=user, auth=auth, refresh=refresh)


__all__ = ["WebApp", "create_app"]

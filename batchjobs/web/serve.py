"""``batchjobs web``: the page on its own, for a laptop or an ops box.

Served by Werkzeug's threaded server: Werkzeug is already what the page is built on, and its
threads keep one slow page (a big change of rows) from holding up the others' auto-refresh, which
wsgiref's single-threaded server would. It binds the loopback by default; anywhere else only with
a password (see :func:`batchjobs.web.security.check_bind`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from werkzeug.serving import make_server

from batchjobs.errors import BatchJobsError
from batchjobs.web.app import WebApp
from batchjobs.web.security import check_bind


def serve(app: WebApp, host: str = "127.0.0.1", port: int = 8089, ready: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` until interrupted; ``ready`` gets the page's address once it listens."""
    check_bind(host, app.auth)
    _check_free(host, port)
    server = make_server(host, port, app, threaded=True)
    shown = f"[{host}]" if ":" in host else host
    if ready is not None:
        ready(f"http://{shown}:{server.server_port}/")
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _check_free(host: str, port: int) -> None:
    """Refuse an address that cannot be bound in one line: Werkzeug would print two and exit."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            # As the server itself binds: a port left in TIME_WAIT by the last run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise BatchJobsError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None

"""``batchjobs web``: the page on its own, for a laptop or an ops box.

Served by Werkzeug's threaded server: Werkzeug is already what the page is built on, and its
threads keep one slow page (a big change of rows) from holding up the others' auto-refresh, which
wsgiref's single-threaded server would. It binds the loopback by default; anywhere else only with
a password (see :func:`batchjobs.web.security.check_bind`).
"""

from __future__ import annotations

from collections.abc import Callable

from werkzeug.serving import make_server

from batchjobs.web.app import WebApp
from batchjobs.web.security import check_bind


def serve(app: WebApp, host: str = "127.0.0.1", port: int = 8089, ready: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` until interrupted; ``ready`` gets the page's address once it listens."""
    check_bind(host, app.auth)
    server = make_server(host, port, app, threaded=True)
    shown = f"[{host}]" if ":" in host else host
    if ready is not None:
        ready(f"http://{shown}:{server.server_port}/")
    try:
        server.serve_forever()
    finally:
        server.server_close()

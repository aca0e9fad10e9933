"""What keeps the page's writes safe: CSRF tokens, HTTP Basic auth, and the loopback rule.

CSRF uses the double-submit pattern: a random token in a cookie (HttpOnly, SameSite=Strict) and the
same token in every form. Another site can make a browser send the cookie but cannot read it, so it
cannot put it into the form. No server-side state: it works across the processes of an app server.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import secrets

from werkzeug.wrappers import Request

from batchjobs.errors import BatchJobsError

CSRF_COOKIE = "batchjobs_csrf"
CSRF_FIELD = "csrf_token"
#: ``user:password`` for the standalone server, instead of ``--auth``.
AUTH_ENV = "BATCHJOBS_WEB_AUTH"


def csrf_token(request: Request) -> tuple[str, bool]:
    """The request's CSRF token, and whether it is new (then the response must set the cookie)."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if _well_formed(current):
        return current, False
    return secrets.token_urlsafe(32), True


def _well_formed(token: str) -> bool:
    return 32 <= len(token) <= 64 and all(c.isalnum() or c in "-_" for c in token)


def csrf_ok(request: Request) -> bool:
    """Whether a POST carries the token of its cookie, and comes from this site if it says where from."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = request.form.get(CSRF_FIELD, "")
    if not (_well_formed(cookie) and hmac.compare_digest(cookie.encode(), sent.encode())):
        return False
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        return origin.split("://", 1)[-1].rstrip("/") == request.host
    return True


def parse_auth(value: str) -> tuple[str, str]:
    """``user:password`` as given to ``--auth`` or in $BATCHJOBS_WEB_AUTH."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise BatchJobsError("--auth: give user:password, both non-empty")
    return user, password


def basic_auth_user(request: Request, expected: tuple[str, str]) -> str | None:
    """The user name if the request's HTTP Basic credentials are ``expected``, else None."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    # Both compared in full, whatever the first comparison says: no timing hint at which was wrong.
    user_ok = hmac.compare_digest(user.encode(), expected[0].encode())
    password_ok = hmac.compare_digest(password.encode(), expected[1].encode())
    return user if user_ok and password_ok else None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the page on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: tuple[str, str] | None) -> None:
    """The loopback rule: the standalone page is reachable from other machines only behind a password."""
    if auth is None and not is_loopback(host):
        raise BatchJobsError(
            f"refusing to serve on {host} without a password: pass --auth user:password or set ${AUTH_ENV} "
            "(or bind 127.0.0.1)"
        )

"""Who is asking, and whether a form came from our own page.

Users log in against the users file (argon2 hashes), or a trusted reverse proxy names
them in a header (`--web-proxy-user-header`): the proxy must set that header on every
request and drop any the browser sent, and only the proxy may reach the port. The
session is Starlette's signed cookie (Secure, HttpOnly, SameSite=Strict); it holds the
user's name and a CSRF token, never patient data.

CSRF: the synchronizer-token pattern. Every session gets a random token; every form
carries it in a hidden field; a POST whose field does not equal the session's token is
refused, whatever its cookie says. Logging in issues a fresh session and token.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from abdoserve.deploy.gateway.worklist.audit import AuditLog
from abdoserve.deploy.gateway.worklist.users import USER_NAME, Users

CSRF_FIELD = "csrf_token"
SESSION_USER = "user"
SESSION_CSRF = "csrf"


@dataclass(frozen=True)
class Access:
    """How users are known: a users file, a proxy header, or both."""

    users: Users | None
    proxy_user_header: str | None
    audit: AuditLog

    def __post_init__(self) -> None:
        if self.users is None and self.proxy_user_header is None:
            raise ValueError("the worklist needs --web-users or --web-proxy-user-header")

    def user(self, request: Request) -> str | None:
        """The signed-in user's name, or None."""
        if self.proxy_user_header is not None:
            named = request.headers.get(self.proxy_user_header)
            if named is not None and USER_NAME.match(named):
                return named
        if self.users is None:
            return None
        name = request.session.get(SESSION_USER)
        return name if isinstance(name, str) and name in self.users.hashes else None

    def log_in(self, request: Request, name: str, password: str) -> bool:
        """Check the password; on success a fresh session (new CSRF token) names the user."""
        if self.users is None or not USER_NAME.match(name) or not self.users.verify(name, password):
            self.audit.record("login_refused", name if USER_NAME.match(name) else None)
            return False
        request.session.clear()
        request.session[SESSION_USER] = name
        request.session[SESSION_CSRF] = secrets.token_urlsafe(32)
        self.audit.record("login", name)
        return True

    def log_out(self, request: Request) -> None:
        self.audit.record("logout", self.user(request))
        request.session.clear()


def csrf_token(request: Request) -> str:
    """The session's token, made on first use (the login form needs one too)."""
    token = request.session.get(SESSION_CSRF)
    if not isinstance(token, str):
        token = request.session[SESSION_CSRF] = secrets.token_urlsafe(32)
    return token


def csrf_valid(request: Request, form: FormData) -> bool:
    expected = request.session.get(SESSION_CSRF)
    given = form.get(CSRF_FIELD)
    return (
        isinstance(expected, str)
        and isinstance(given, str)
        and hmac.compare_digest(expected.encode(), given.encode())
    )


def refusal(request: Request) -> Response:
    """What a request without a user gets: a page, the login; anything else, 403."""
    if request.method == "GET" and not request.url.path.endswith(".png"):
        return RedirectResponse("/login", status_code=303)
    return PlainTextResponse("sign in first", status_code=403)

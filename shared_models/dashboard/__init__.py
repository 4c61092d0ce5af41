"""What the coordinator's and the hospital's dashboards share: templates, static files, the
access rules and the web server.

Both dashboards are read-only Starlette apps (https://www.starlette.io) rendering Jinja2
templates with autoescaping on, so every value read from a run folder, a ledger or an audit log
is shown as text. Charts are drawn in the browser by uPlot 1.6.32 (MIT licence,
``static/uPlot.LICENSE``), shipped in this package from the npm registry (``npm pack
uplot@1.6.32``): nothing is fetched at run time. Pages poll their own JSON and HTML fragments
once a second while a run goes on.

Access rules (:func:`guarded`):

- only the files of ``static/`` are served as files (Starlette's ``StaticFiles``, which refuses
  paths outside its folder); the apps serve run artefacts by a fixed list of names;
- every request must name a ``Host`` that the server answers as (loopback names by default), so a
  web page elsewhere cannot read a loopback dashboard through DNS rebinding;
- with a token, every request must carry it (``Authorization: Bearer TOKEN``, or the cookie that
  ``/?token=TOKEN`` sets); a request without it is answered 401 and nothing else.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

HERE = Path(__file__).parent
STATIC = HERE / "static"
TOKEN_COOKIE = "fedcare-dashboard-token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every value from a run config, a log or a ledger is text, never markup
    undefined=jinja2.StrictUndefined,
)


def _number(value: Any, digits: int = 3) -> str:
    """A metric or ε for a table: ``digits`` decimals, ``∞`` for infinity, ``–`` when missing."""
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isinf(v):
        return "∞"
    if math.isnan(v):
        return "–"
    return f"{v:.{digits}f}"


templates.filters["num"] = _number


def render(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """An HTML response from template ``name`` (autoescaped)."""
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status_code)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenGate:
    """ASGI middleware: every request must carry ``token`` (bearer header or cookie).

    ``GET /?token=TOKEN`` with the right token sets an HttpOnly, SameSite=Strict cookie (Secure
    over TLS) and redirects to ``/``, so a browser can open the dashboard from a link once.
    Tokens are compared in constant time (:func:`hmac.compare_digest`).
    """

    def __init__(self, app: ASGIApp, *, token: str, secure: bool) -> None:
        self.app = app
        self.token = token.encode()
        self.secure = secure

    def _matches(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        bearer = request.headers.get("authorization", "")
        presented = bearer[7:] if bearer.lower().startswith("bearer ") else None
        if self._matches(presented) or self._matches(request.cookies.get(TOKEN_COOKIE)):
            await self.app(scope, receive, send)
            return
        response: Response
        if request.url.path == "/" and self._matches(request.query_params.get("token")):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                TOKEN_COOKIE, self.token.decode(), httponly=True, samesite="strict",
                secure=self.secure,
            )  # fmt: skip
        else:
            response = PlainTextResponse(
                "401: this dashboard needs its token (open /?token=TOKEN once)", status_code=401,
                headers={"www-authenticate": "Bearer"},
            )  # fmt: skip
        await response(scope, receive, send)


def guarded(
    routes: Sequence[BaseRoute],
    *,
    hosts: Sequence[str] = LOOPBACK_NAMES,
    token: str | None = None,
    tls: bool = False,
) -> Starlette:
    """A Starlette app of ``routes`` plus ``/static``, behind the access rules above.

    Parameters
    ----------
    routes : sequence of Route
        The dashboard's own routes (read-only: GET only).
    hosts : sequence of str
        Host names the server answers as (``Host`` header; others get 400).
    token : str, optional
        When given, every request must carry it (401 otherwise).
    tls : bool
        Whether the server runs over TLS (the token cookie is then marked Secure).
    """
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))]
    if token is not None:
        middleware.append(Middleware(TokenGate, token=token, secure=tls))
    routes = [*routes, Mount("/static", app=StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, middleware=middleware)


def serve(
    app: Starlette,
    *,
    host: str,
    port: int,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> None:
    """Serve ``app`` with uvicorn until interrupted (over TLS when ``certfile`` is given)."""
    import uvicorn

    uvicorn.run(
        app, host=host, port=port, log_level="warning", access_log=False,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        server_header=False,
    )  # fmt: skip

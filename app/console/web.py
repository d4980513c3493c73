"""``create_console_app(settings)``: the lifespan owns the index pool, the ingester task and
the HTTP clients (OPA, the gateway, the identity provider); routers per concern
(app/console/pages.py, approvals_pages.py, signin.py) reach them through
``request.app.state.console``.

Server-rendered pages (Jinja2, autoescaped) with htmx (vendored in static/) for the filter
form, the live approvals inbox and nothing else; no inline script or style, so the
Content-Security-Policy is ``default-src 'self'`` with no exception. Every error is one page
with a stable code (the gateway's codes, plus the console's own in docs/console.md); a
traceback never reaches the browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import ConfigError, Settings
from app.console.auth import OidcClient, Session, Sessions, User, cookie_policy
from app.console.clients import AccessPolicy, GatewayApi
from app.console.ingest import FileIngester, KafkaIngester
from app.console.queries import Scope
from app.console.store import make_ingester, open_pool
from app.errors import GatewayError, Unauthenticated

log = logging.getLogger("querygate.console")
HERE = Path(__file__).resolve().parent

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


@dataclass
class Console:
    """Everything a page needs, built by the lifespan."""

    settings: Settings
    public_url: str
    cookie_name: str
    cookie_secure: bool
    sessions: Sessions
    templates: jinja2.Environment
    pool: asyncpg.Pool
    http: httpx.AsyncClient
    policy: AccessPolicy
    api: GatewayApi
    oidc: OidcClient | None
    ingester: FileIngester | KafkaIngester

    @property
    def origin(self) -> str:
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"


class SignInRequired(Exception):
    """A page was asked for without a session: the browser goes to /login."""


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def session_of(request: Request) -> Session | None:
    console = console_of(request)
    return console.sessions.get(request.cookies.get(console.cookie_name))


@dataclass
class Reader:
    """A signed-in user, their session and what policy lets them see."""

    console: Console
    session: Session
    user: User
    scope: Scope


async def reader(request: Request) -> Reader:
    """The signed-in reader of this request (policy asked every time: fail closed)."""
    console = console_of(request)
    session = session_of(request)
    if session is None or session.user is None:
        if request.method == "GET":
            raise SignInRequired
        raise Unauthenticated("signin_required", "sign in first")
    scope = await console.policy.scope(session.user)
    return Reader(console, session, session.user, scope)


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return _when(dt.datetime.fromisoformat(value))
    return "" if value is None else str(value)


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
        undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["when"] = _when
    return env


def render(request: Request, name: str, status: int = 200, session: Session | None = None,
           **context: Any) -> HTMLResponse:
    """A page (or, for htmx, a fragment) with the session's CSRF token and the user."""
    console = console_of(request)
    session = session or session_of(request)
    html = console.templates.get_template(name).render(
        user=session.user if session else None,
        csrf=session.csrf if session else "",
        dev_mode=console.settings.dev_mode,
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status)


def set_session_cookie(response: Response, console: Console, session: Session) -> None:
    response.set_cookie(
        console.cookie_name, session.id, max_age=console.settings.console_session_ttl_s,
        httponly=True, secure=console.cookie_secure, samesite="lax", path="/",
    )


def error_page(request: Request, status: int, code: str, message: str) -> Response:
    if request.url.path.endswith(".json") or request.url.path in ("/readyz", "/healthz"):
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
    try:
        return render(request, "error.html", status=status, code=code, message=message)
    except Exception:  # the error page itself must not fail
        log.exception("error page failed")
        return HTMLResponse(f"<h1>{status}</h1><p>{code}</p>", status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_page(request, exc.status, exc.code, exc.message)

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_page(request, 400, "invalid_request", "the request's parameters are invalid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_page(request, exc.status_code, code, "no such page")

    @app.exception_handler(asyncpg.PostgresError)
    async def index_error(request: Request, exc: asyncpg.PostgresError) -> Response:
        log.error("audit index query failed: %s", type(exc).__name__)
        return error_page(request, 503, "index_unavailable", "the audit index cannot answer now")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("console error")
        return error_page(request, 500, "internal_error", "something went wrong")


def security_headers(app: FastAPI) -> None:
    @app.middleware("http")
    async def headers(request: Request,
                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["content-security-policy"] = CSP
        response.headers["x-content-type-options"] = "nosniff"
        # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on a
        # form post, and the CSRF check compares the Origin with the console's own.
        response.headers["referrer-policy"] = "same-origin"
        response.headers["x-frame-options"] = "DENY"
        if not request.url.path.startswith("/static/"):
            response.headers["cache-control"] = "no-store"
        return response


def create_console_app(settings: Settings) -> FastAPI:
    """Build the console; nothing connects until the lifespan starts."""
    from app.console import approvals_pages, pages, signin

    if settings.console_database_url is None:
        raise ConfigError("QUERYGATE_CONSOLE_DATABASE_URL is required (the audit index)")
    public_url = (settings.console_public_url
                  or f"http://{settings.console_host}:{settings.console_port}").rstrip("/")
    cookie_name, cookie_secure = cookie_policy(settings, public_url)
    templates = make_templates()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=3.0))
        opa = httpx.AsyncClient(timeout=settings.opa_timeout_ms / 1000)
        pool = await open_pool(settings)
        ingester = make_ingester(settings, pool)
        task = asyncio.create_task(ingester.run())
        oidc = None
        if settings.console_oidc_issuer is not None:
            oidc = OidcClient(settings, f"{public_url}/auth/callback", http)
        app.state.console = Console(
            settings=settings, public_url=public_url, cookie_name=cookie_name,
            cookie_secure=cookie_secure, sessions=Sessions(settings.console_session_ttl_s),
            templates=templates, pool=pool, http=http,
            policy=AccessPolicy(opa, settings.opa_url, settings.console_opa_path),
            api=GatewayApi(http, settings.console_gateway_url), oidc=oidc, ingester=ingester,
        )
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pool.close()
            await http.aclose()
            await opa.aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    security_headers(app)
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(signin.router)
    app.include_router(pages.router)
    app.include_router(approvals_pages.router)
    return app


def serve(settings: Settings) -> None:
    """`querygate console`: the pages on QUERYGATE_CONSOLE_HOST:PORT (and, in `querygate dev`,
    the dev OIDC provider on QUERYGATE_CONSOLE_DEV_IDP_PORT)."""
    import uvicorn

    apps: list[tuple[Any, int]] = [(create_console_app(settings), settings.console_port)]
    if settings.console_dev_idp_port is not None:
        from app.console.devidp import create_dev_idp

        apps.append((create_dev_idp(settings), settings.console_dev_idp_port))

    class Quiet(uvicorn.Server):
        """A second server in the process: the first one owns the signals."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    def config(app: Any, port: int) -> uvicorn.Config:
        return uvicorn.Config(
            app, host=settings.console_host, port=port, log_level=settings.log_level,
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            lifespan="on",
        )

    async def run_all() -> None:
        others = [Quiet(config(app, port)) for app, port in apps[1:]]
        tasks = [asyncio.create_task(server.serve()) for server in others]
        try:
            await uvicorn.Server(config(*apps[0])).serve()
        finally:
            for server in others:
                server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_all())

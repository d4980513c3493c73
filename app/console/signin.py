"""/login, /login/dev, /login/oidc, /auth/callback, /logout (app/console/auth.py says how)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from app.console.auth import Session, check_csrf, dev_user
from app.console.web import Console, console_of, render, session_of, set_session_cookie
from app.errors import NotFound, Unauthenticated

router = APIRouter()


def _anonymous(request: Request, console: Console) -> tuple[Session, bool]:
    session = session_of(request)
    if session is not None:
        return session, False
    return console.sessions.new(ttl_s=600), True


async def form_of(request: Request) -> dict[str, str]:
    """The posted form's text fields (files and repeated fields are not used here)."""
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


def _signed_in(console: Console, old: Session, session: Session) -> Response:
    console.sessions.drop(old)  # a new id at sign-in: a planted cookie is worth nothing
    response = RedirectResponse("/events", status_code=303)
    set_session_cookie(response, console, session)
    return response


@router.get("/login")
async def login(request: Request) -> Response:
    """The sign-in page: OIDC, and the demo identities in dev mode."""
    from app.demo import DEMO_IDENTITIES

    console = console_of(request)
    session, fresh = _anonymous(request, console)
    response = render(request, "login.html", session=session,
                      identities=DEMO_IDENTITIES if console.settings.dev_mode else {},
                      oidc=console.oidc is not None)
    if fresh:
        set_session_cookie(response, console, session)
    return response


@router.post("/login/dev")
async def login_dev(request: Request) -> Response:
    """Sign in as a demo identity (dev mode only)."""
    from app.demo import DEMO_IDENTITIES

    console = console_of(request)
    if not console.settings.dev_mode:
        raise NotFound("dev_signin_disabled", "dev sign-in exists only in dev mode")
    session = session_of(request)
    form = await form_of(request)
    check_csrf(session, form.get("csrf"), request.headers.get("origin"), console.origin)
    assert session is not None
    user = dev_user(console.settings, form.get("sub", ""), DEMO_IDENTITIES)
    return _signed_in(console, session, console.sessions.new(user))


@router.get("/login/oidc")
async def login_oidc(request: Request) -> Response:
    """Begin the authorization code flow with PKCE."""
    console = console_of(request)
    if console.oidc is None:
        raise NotFound("oidc_not_configured", "no OIDC issuer is configured")
    session, _ = _anonymous(request, console)
    url = await console.oidc.authorization_url(session)
    response = RedirectResponse(url, status_code=303)
    set_session_cookie(response, console, session)
    return response


@router.get("/auth/callback")
async def callback(request: Request) -> Response:
    """The identity provider's redirect back: exchange the code, verify, sign in."""
    console = console_of(request)
    session = session_of(request)
    if console.oidc is None:
        raise NotFound("oidc_not_configured", "no OIDC issuer is configured")
    if session is None:
        raise Unauthenticated("signin_failed", "the sign-in is not the one this browser began")
    user = await console.oidc.finish(session, dict(request.query_params))
    return _signed_in(console, session, console.sessions.new(user))


@router.post("/logout")
async def logout(request: Request) -> Response:
    console = console_of(request)
    session = session_of(request)
    form = await form_of(request)
    check_csrf(session, form.get("csrf"), request.headers.get("origin"), console.origin)
    assert session is not None
    console.sessions.drop(session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(console.cookie_name, path="/", secure=console.cookie_secure,
                           httponly=True, samesite="lax")
    return response

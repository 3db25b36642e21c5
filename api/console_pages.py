"""The console's page plumbing: Jinja2 templates, the signed-in person as a route
dependency (scope checked on the server for every page and action), the CSRF
check of every form, and the answers for "not signed in" and "not allowed"."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.console_auth import ConsoleDenied, ConsoleUser, csrf_token, csrf_valid, session_user
from api.deps import EngineDep, SecretKeyDep

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
templates = Jinja2Templates(directory=str(HERE / "templates" / "console"))


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _day(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d")


templates.env.filters["when"] = _when
templates.env.filters["day"] = _day


def render(request: Request, name: str, user: ConsoleUser | None, status: int = 200, **context: object) -> HTMLResponse:
    key = request.app.state.secret_key
    csrf = csrf_token(key, user.nonce) if user is not None else context.pop("csrf", "")
    answer = templates.TemplateResponse(request, name, {"user": user, "csrf": csrf, "now": datetime.now(timezone.utc),
                                                         "status_code": status,
                                                         **context}, status_code=status)
    answer.headers["Cache-Control"] = "no-store"  # pages may hold personal data: never cached
    answer.headers["X-Frame-Options"] = "DENY"
    answer.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                                 "script-src 'self'; form-action 'self'; frame-ancestors 'none'")
    answer.headers["Referrer-Policy"] = "same-origin"
    return answer


def console_user(*scopes: str) -> Callable[..., ConsoleUser]:
    """A dependency: the signed-in person holding any of ``scopes`` (admin holds them all)."""
    wanted = " or ".join(scopes)

    def signed_in(request: Request, engine: EngineDep, key: SecretKeyDep) -> ConsoleUser:
        user = session_user(engine, key, request)
        if user is None:
            raise ConsoleDenied(401, "Sign in to continue.")
        if not user.holds(*scopes):
            held = ", ".join(sorted(user.scopes)) or "none"
            raise ConsoleDenied(403, f"This page needs the {wanted} scope; your token has: {held}.")
        return user

    return signed_in


def checked_action(*scopes: str) -> Callable[..., ConsoleUser]:
    """``console_user`` for a form post, which must also carry this session's CSRF token."""
    signed_in = console_user(*scopes)

    # the dependency as a default: a string annotation could not name the local ``signed_in``
    def action(key: SecretKeyDep, csrf: Annotated[str | None, Form()] = None,
               user: ConsoleUser = Depends(signed_in)) -> ConsoleUser:  # noqa: B008
        if not csrf_valid(key, user.nonce, csrf):
            raise ConsoleDenied(403, "The form's CSRF token is missing or wrong; reload the page and try again.")
        return user

    return action


Reader = Annotated[ConsoleUser, Depends(console_user("review", "audit"))]
Auditor = Annotated[ConsoleUser, Depends(console_user("audit"))]
ReviewAction = Annotated[ConsoleUser, Depends(checked_action("review"))]
AuditAction = Annotated[ConsoleUser, Depends(checked_action("audit"))]


def home_for(user: ConsoleUser) -> str:
    return f"{PREFIX}/requests" if user.holds("review", "audit") else f"{PREFIX}/sign-in"


def install_console(app: FastAPI) -> None:
    """Mount the console's routes, stylesheet and error pages on the API app."""
    from api.routes.console import router as console_router
    from api.routes.console_audit import router as audit_router

    app.include_router(console_router)
    app.include_router(audit_router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(HERE / "static")), name="console-static")

    @app.exception_handler(ConsoleDenied)
    async def _denied(request: Request, exc: ConsoleDenied) -> Response:
        if exc.status == 401 and request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{PREFIX}/sign-in?next={quote(target, safe='')}", status_code=303)
        user = session_user(request.app.state.engine, request.app.state.secret_key, request)
        return render(request, "denied.html", user, status=exc.status, message=exc.message)

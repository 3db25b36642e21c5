"""/console: sign-in, the requests table, a request's page and the reviewer's actions.

Thin routes over the service layer: the review buttons record decisions through
``api.routes.requests.decide_and_continue`` (the API's own path, with the signed-in
token as reviewer); extension and denial call ``pipeline.lifecycle`` as the API does.
Reviewer and auditor may read; only a reviewer acts and sees texts.
"""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, BackgroundTasks, Form, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from api.console_auth import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    ConsoleDenied,
    cookie_options,
    csrf_token,
    csrf_valid,
    new_signin_cookie,
    record_sign_out,
    session_user,
    signin_nonce,
    sign_in_with,
)
from api.console_pages import PREFIX, Reader, ReviewAction, home_for, render
from api.deps import EngineDep, SecretKeyDep, SessionDep, SettingsDep
from api.routes.requests import decide_and_continue
from db.console_queries import DUE_FILTERS, request_page
from pipeline.console_views import request_view
from pipeline.lifecycle import (
    MAX_EXTENSION_MONTHS,
    OPEN_STATES,
    DenialGround,
    RequestError,
    RequestNotFound,
    RequestState,
    ReviewInput,
    ReviewVerdict,
    deny_request,
    extend_deadline,
)

router = APIRouter(prefix=PREFIX, include_in_schema=False)
PAGE_SIZE = 50
STATE_FILTERS = ("open", "all", *[s.value for s in RequestState])


def _safe_next(target: str | None) -> str | None:
    """Only a console path (never another site) is a place to return to after sign-in."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return None


# ---------------------------------------------------------------- session


@router.get("")
def console_home(request: Request, engine: EngineDep, key: SecretKeyDep) -> Response:
    user = session_user(engine, key, request)
    return RedirectResponse(home_for(user) if user else f"{PREFIX}/sign-in", status_code=303)


@router.get("/sign-in")
def sign_in_page(request: Request, key: SecretKeyDep, next: Annotated[str | None, Query()] = None) -> Response:  # noqa: A002
    cookie, nonce = new_signin_cookie(key)
    answer = render(request, "sign_in.html", None, csrf=csrf_token(key, nonce), next=_safe_next(next) or "")
    answer.set_cookie(SIGNIN_COOKIE, cookie, **cookie_options(request, SIGNIN_SECONDS))
    return answer


@router.post("/sign-in")
def sign_in(request: Request, engine: EngineDep, key: SecretKeyDep, token: Annotated[str, Form()] = "",
            csrf: Annotated[str | None, Form()] = None, next: Annotated[str | None, Form()] = None) -> Response:  # noqa: A002
    nonce = signin_nonce(key, request)
    if nonce is None or not csrf_valid(key, nonce, csrf):
        raise ConsoleDenied(403, "The sign-in form's CSRF token is missing or expired; reload the page and sign in.")
    session_cookie, refusal = sign_in_with(engine, key, token)
    if session_cookie is None:
        cookie, nonce = new_signin_cookie(key)
        answer = render(request, "sign_in.html", None, status=401, csrf=csrf_token(key, nonce), error=refusal,
                        next=_safe_next(next) or "")
        answer.set_cookie(SIGNIN_COOKIE, cookie, **cookie_options(request, SIGNIN_SECONDS))
        return answer
    cookie = session_cookie
    answer = RedirectResponse(_safe_next(next) or f"{PREFIX}/requests", status_code=303)
    answer.set_cookie(SESSION_COOKIE, cookie, **cookie_options(request, SESSION_SECONDS))
    answer.delete_cookie(SIGNIN_COOKIE, path=PREFIX)
    return answer


@router.post("/sign-out")
def sign_out_action(request: Request, engine: EngineDep, key: SecretKeyDep,
                    csrf: Annotated[str | None, Form()] = None) -> Response:
    user = session_user(engine, key, request)
    if user is None:
        raise ConsoleDenied(401, "You are not signed in.")
    if not csrf_valid(key, user.nonce, csrf):
        raise ConsoleDenied(403, "The form's CSRF token is missing or wrong; reload the page and try again.")
    record_sign_out(engine, user)
    answer = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    answer.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return answer


# ---------------------------------------------------------------- requests


@router.get("/requests")
def requests_table(
    request: Request, user: Reader, session: SessionDep,
    state: Annotated[str, Query()] = "open",
    due: Annotated[str, Query()] = "any",
    after: Annotated[str | None, Query(max_length=120)] = None,
) -> Response:
    if state not in STATE_FILTERS or due not in DUE_FILTERS:
        return render(request, "denied.html", user, status=422,
                      message=f"Unknown filter: state is one of {', '.join(STATE_FILTERS)}; "
                              f"due is one of {', '.join(DUE_FILTERS)}.")
    states = OPEN_STATES if state == "open" else None if state == "all" else {state}
    try:
        page = request_page(session, states=states, due=due, after=after, limit=PAGE_SIZE)
    except ValueError as exc:
        return render(request, "denied.html", user, status=422, message=f"Bad page link: {exc}.")
    next_link = (f"{PREFIX}/requests?" + urlencode({"state": state, "due": due, "after": page.next_cursor})
                 if page.next_cursor else None)
    return render(request, "requests.html", user, page=page, state=state, due=due, states=STATE_FILTERS,
                  dues=DUE_FILTERS, next_link=next_link, first_page=after is not None)


@router.get("/requests/{request_id}")
def request_detail(request: Request, request_id: uuid.UUID, user: Reader, session: SessionDep,
                   settings: SettingsDep) -> Response:
    try:
        view = request_view(settings, session, str(request_id), reviewer=user.holds("review"))
    except RequestNotFound as exc:
        raise ConsoleDenied(404, str(exc)) from None
    return render(request, "request.html", user, view=view, grounds=list(DenialGround),
                  max_months=MAX_EXTENSION_MONTHS, verdicts=list(ReviewVerdict))


def _acted(request: Request, user: object, request_id: uuid.UUID, action: object) -> Response:
    """Run a reviewer's action; a refusal of the service layer (wrong state, bad input) is shown as a page."""
    try:
        action()
    except RequestError as exc:
        status = 404 if isinstance(exc, LookupError) else 422 if isinstance(exc, ValueError) else 409
        return render(request, "denied.html", user, status=status, message=str(exc),
                      back=f"{PREFIX}/requests/{request_id}")
    return RedirectResponse(f"{PREFIX}/requests/{request_id}", status_code=303)


@router.post("/requests/{request_id}/decisions")
def decide(request: Request, request_id: uuid.UUID, user: ReviewAction, session: SessionDep, key: SecretKeyDep,
           background: BackgroundTasks, match_ref: Annotated[str, Form(max_length=200)],
           decision: Annotated[str, Form(max_length=16)]) -> Response:
    return _acted(request, user, request_id, lambda: decide_and_continue(
        session, str(request_id), [ReviewInput(match_ref, decision)], reviewer=user.actor, key=key,
        http_request=request, background=background))


@router.post("/requests/{request_id}/extension")
def extend(request: Request, request_id: uuid.UUID, user: ReviewAction, session: SessionDep, key: SecretKeyDep,
           months: Annotated[int, Form(ge=1, le=MAX_EXTENSION_MONTHS)], reason: Annotated[str, Form(max_length=4000)]
           ) -> Response:
    return _acted(request, user, request_id, lambda: extend_deadline(
        session, str(request_id), months=months, reason=reason, actor=user.actor, key=key))


@router.post("/requests/{request_id}/denial")
def deny(request: Request, request_id: uuid.UUID, user: ReviewAction, session: SessionDep, key: SecretKeyDep,
         ground: Annotated[str, Form(max_length=40)], detail: Annotated[str, Form(max_length=4000)]) -> Response:
    return _acted(request, user, request_id, lambda: deny_request(
        session, str(request_id), ground=ground, detail=detail, actor=user.actor, key=key))


@router.get("/requests/{request_id}/certificate.json")
def certificate_download(request_id: uuid.UUID, user: Reader, session: SessionDep) -> Response:
    from pipeline.certificate import stored_certificate

    issued = stored_certificate(session, str(request_id))
    if issued is None:
        raise ConsoleDenied(404, "This request has no certificate yet: one is issued when it completes.")
    return Response(issued.document, media_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="certificate-{request_id}.json"', "Cache-Control": "no-store"})


@router.get("/requests/{request_id}/probe/{dataset}.png")
def probe_plot(request_id: uuid.UUID, dataset: str, user: Reader, settings: SettingsDep,
               session: SessionDep) -> Response:
    from pipeline.membership import report_file
    from shards.store import validate_dataset_name

    try:
        name = validate_dataset_name(dataset)
    except ValueError as exc:
        raise ConsoleDenied(404, str(exc)) from None
    path = report_file(settings, session, str(request_id), name)
    if path is None:
        raise ConsoleDenied(404, "No membership-probe plot for this request and dataset.")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})

"""Every console route, walked without a session, with a token lacking the scope and
with one holding it: the scope is checked on the server for each page and action,
and every form post needs the session's CSRF token. The walk must name every route
the app has under /console, so a new page cannot be added without its checks.

In-process (FastAPI's TestClient over the real app and database); the browser test
(tests/e2e/test_console_browser.py) covers the pages as a person uses them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.console_auth import SESSION_COOKIE
from db.requests import issue_token
from db.session import unit_of_work
from pipeline.lifecycle import submit_request

RID = "{rid}"
# (method, path, scopes that may use it, form, status with the scope)
ROUTES = [
    ("GET", "/console/requests", {"review", "audit"}, None, 200),
    ("GET", "/console/requests/{rid}", {"review", "audit"}, None, 200),
    ("GET", "/console/requests/{rid}/certificate.json", {"review", "audit"}, None, 404),  # not completed yet
    ("GET", "/console/requests/{rid}/probe/demo.png", {"review", "audit"}, None, 404),  # no probe yet
    ("POST", "/console/requests/{rid}/decisions", {"review"}, {"match_ref": "0/r1", "decision": "erase"},
     409),  # the service refuses: the request is not awaiting review
    ("POST", "/console/requests/{rid}/extension", {"review"}, {"months": "1", "reason": "complex request"}, 303),
    ("POST", "/console/requests/{rid}/denial", {"review"}, {"ground": "legal_claims", "detail": "pending claim"},
     303),
    ("GET", "/console/datasets", {"review", "audit"}, None, 200),
    ("GET", "/console/audit", {"audit"}, None, 200),
    ("POST", "/console/audit/chain", {"audit"}, {}, 200),
    ("POST", "/console/audit/subject", {"audit"}, {"kind0": "email", "value0": "someone@example.org"}, 200),
    ("GET", "/console/audit/ensembles/abc123", {"audit"}, None, 404),  # no such version
]
OPEN_ROUTES = {("GET", "/console"), ("GET", "/console/sign-in"), ("POST", "/console/sign-in"),
               ("POST", "/console/sign-out")}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def _signed_in(app, token: str) -> tuple[TestClient, str]:  # noqa: ANN001
    client = TestClient(app, base_url="http://testserver")
    answer = client.post("/console/sign-in", data={"token": token, "csrf": _csrf(client.get("/console/sign-in").text)},
                         follow_redirects=False)
    assert answer.status_code == 303, answer.text
    cookie = answer.headers["set-cookie"]
    assert SESSION_COOKIE in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
    return client, _csrf(client.get("/console/requests").text if token else "")


@pytest.fixture
def console(settings):  # noqa: ANN001, ANN201  (SQLite and PostgreSQL)
    app = create_app(settings)
    with unit_of_work(app.state.engine) as session:
        tokens = {scope: issue_token(session, f"{scope}-person", [scope])[0] for scope in ("review", "audit", "intake")}
    yield app, tokens
    app.state.engine.dispose()


def _request(app, key: str) -> str:  # noqa: ANN001
    return submit_request(app.state.engine, app.state.settings.secret_key_bytes(), idempotency_key=key,
                          identifiers=[("email", f"{key}@example.org")], samples=[], actor="test").request_id


def test_the_walk_names_every_console_route(console) -> None:  # noqa: ANN001
    from api.routes.console import router as pages
    from api.routes.console_audit import router as audit_pages

    served = {(method, route.path) for router in (pages, audit_pages) for route in router.routes
              for method in route.methods}
    walked = {(m, re.sub(r"\{rid\}", "{request_id}", p)) for m, p, *_ in ROUTES}
    normalised = {(m, re.sub(r"/abc123$", "/{version_id}", re.sub(r"/demo\.png$", "/{dataset}.png", p)))
                  for m, p in walked}
    assert served - OPEN_ROUTES == normalised


def test_every_console_route_checks_session_scope_and_csrf(console) -> None:  # noqa: ANN001
    app, tokens = console
    anonymous = TestClient(app, base_url="http://testserver")
    reviewer, reviewer_csrf = _signed_in(app, tokens["review"])
    auditor, auditor_csrf = _signed_in(app, tokens["audit"])
    sessions = {"review": (reviewer, reviewer_csrf), "audit": (auditor, auditor_csrf)}
    for method, template, allowed, form, ok_status in ROUTES:
        path = template.replace(RID, _request(app, f"walk-{len(template)}-{method}-{ok_status}"))
        # without a session: a page sends the person to sign in; an action is refused
        answer = anonymous.request(method, path, data=form, follow_redirects=False)
        if method == "GET":
            assert answer.status_code == 303 and answer.headers["location"].startswith("/console/sign-in?next=")
        else:
            assert answer.status_code == 401, (path, answer.status_code)
        for scope, (client, csrf) in sessions.items():
            if method == "POST":  # a post without the CSRF token is refused whatever the scope
                refused = client.post(path, data=form, follow_redirects=False)
                assert refused.status_code == 403, (scope, path, refused.status_code)
                answer = client.post(path, data={**form, "csrf": csrf}, follow_redirects=False)
            else:
                answer = client.get(path, follow_redirects=False)
            expected = ok_status if scope in allowed else 403
            assert answer.status_code == expected, (scope, method, path, answer.status_code, answer.text[-400:])
    unknown = reviewer.get("/console/requests/00000000-0000-4000-8000-000000000000")
    assert unknown.status_code == 404 and "no erasure request" in unknown.text and "<html" in unknown.text


def test_sign_in_refuses_unknown_tokens_tokens_without_a_console_scope_and_a_missing_csrf(console) -> None:  # noqa: ANN001
    app, tokens = console
    client = TestClient(app, base_url="http://testserver")
    csrf = _csrf(client.get("/console/sign-in").text)
    assert client.post("/console/sign-in", data={"token": tokens["review"]}, follow_redirects=False).status_code == 403
    wrong = client.post("/console/sign-in", data={"token": "er_wrong", "csrf": csrf})
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.text
    intake = client.post("/console/sign-in", data={"token": tokens["intake"], "csrf": _csrf(wrong.text)})
    assert intake.status_code == 401 and "none of the console" in intake.text
    assert SESSION_COOKIE not in client.cookies


def test_a_forged_or_revoked_session_is_signed_out(console) -> None:  # noqa: ANN001
    from db.requests import revoke_token

    app, tokens = console
    client, csrf = _signed_in(app, tokens["review"])
    assert client.get("/console/requests", follow_redirects=False).status_code == 200
    value = client.cookies[SESSION_COOKIE]
    payload, _, mac = value.rpartition(".")
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, payload[:-2] + "xx." + mac)  # an edited payload
    assert client.get("/console/requests", follow_redirects=False).status_code == 303
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, value)
    assert client.get("/console/requests", follow_redirects=False).status_code == 200
    with unit_of_work(app.state.engine) as session:
        revoke_token(session, "review-person")
    assert client.get("/console/requests", follow_redirects=False).status_code == 303


def test_sign_out_ends_the_session(console) -> None:  # noqa: ANN001
    app, tokens = console
    client, csrf = _signed_in(app, tokens["review"])
    assert client.post("/console/sign-out", data={}, follow_redirects=False).status_code == 403  # CSRF
    answer = client.post("/console/sign-out", data={"csrf": csrf}, follow_redirects=False)
    assert answer.status_code == 303
    assert client.get("/console/requests", follow_redirects=False).status_code == 303
    # who used the console, and when, is on the audit log (ids only)
    from sqlalchemy import select

    from db.audit import AuditEvent

    with unit_of_work(app.state.engine) as session:
        events = session.execute(select(AuditEvent.kind, AuditEvent.actor, AuditEvent.details)
                                 .where(AuditEvent.kind.like("console.%")).order_by(AuditEvent.id)).all()
    assert [(kind, actor) for kind, actor, _ in events] == [("console.signed_in", "token:review-person"),
                                                           ("console.signed_out", "token:review-person")]
    assert tokens["review"] not in "".join(details for _, _, details in events)


def test_the_requests_table_pages_by_deadline_and_filters_overdue(console) -> None:  # noqa: ANN001
    from datetime import timedelta

    from db.console_queries import request_page
    from pipeline.lifecycle import get_request

    app, tokens = console
    ids = [_request(app, f"page-{i}") for i in range(7)]
    with unit_of_work(app.state.engine) as session:
        late = get_request(session, ids[3])
        late.due_at = late.received_at - timedelta(days=1)
    seen, cursor = [], None
    with unit_of_work(app.state.engine) as session:
        while True:
            page = request_page(session, states=None, after=cursor, limit=3)
            assert page.total == 7 and len(page.rows) <= 3
            seen += [row.id for row in page.rows]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids) and len(seen) == 7
        assert seen[0] == ids[3]  # earliest deadline first
        overdue = request_page(session, states=None, due="overdue")
        assert [row.id for row in overdue.rows] == [ids[3]] and overdue.total == 1
    client, _ = _signed_in(app, tokens["review"])
    table = client.get("/console/requests?state=all&due=overdue").text
    assert ids[3][:8] in table and ids[0][:8] not in table and 'class="overdue' in table

"""An intake token sees only the requests it submitted (issue 10, point 6b), over
HTTP on both backends: another intake token's GET answers 404 as if the request
did not exist, a replayed Idempotency-Key from another token is a conflict (it
does not hand out the first token's request), and review, audit and admin
tokens still see every request. The review-ticket route needs the review scope."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from db.requests import ApiToken, ErasureRequest, issue_token
from db.session import unit_of_work
from db.settings import Settings
from pipeline.lifecycle import verify_review_ticket

BASE = "/v1/erasure-requests"
BODY = {"identifiers": [{"kind": "email", "value": "Jane.Doe@example.org"}], "samples": []}


@pytest.fixture
def client_and_tokens(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    app = create_app(settings)
    tokens = {}
    with unit_of_work(app.state.engine) as session:
        for name, scopes in {"portal-a": ["intake"], "portal-b": ["intake"], "reviewer": ["review"],
                             "auditor": ["audit"], "admin": ["admin"]}.items():
            tokens[name], _ = issue_token(session, name, scopes)
    with TestClient(app) as client:
        yield client, tokens


def _auth(tokens: dict[str, str], who: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[who]}", **headers}


def test_an_intake_token_sees_only_its_own_requests(client_and_tokens, settings: Settings) -> None:  # noqa: ANN001
    client, tokens = client_and_tokens
    key = str(uuid.uuid4())
    submitted = client.post(BASE, json=BODY, headers=_auth(tokens, "portal-a", **{"Idempotency-Key": key}))
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["id"]
    with unit_of_work(client.app.state.engine) as session:
        row = session.get(ErasureRequest, request_id)
        token_a = session.scalars(select(ApiToken).where(ApiToken.name == "portal-a")).one()
        assert row.submitted_by_token_id == token_a.id

    assert client.get(f"{BASE}/{request_id}", headers=_auth(tokens, "portal-a")).status_code == 200
    other = client.get(f"{BASE}/{request_id}", headers=_auth(tokens, "portal-b"))
    unknown = client.get(f"{BASE}/{uuid.uuid4()}", headers=_auth(tokens, "portal-b"))
    assert other.status_code == unknown.status_code == 404
    assert other.json()["error"]["code"] == unknown.json()["error"]["code"]  # indistinguishable from "no such request"
    for who in ("reviewer", "auditor", "admin"):
        seen = client.get(f"{BASE}/{request_id}", headers=_auth(tokens, who))
        assert seen.status_code == 200 and seen.json()["id"] == request_id, who

    # The same key and body from another token does not replay the first token's request.
    replay = client.post(BASE, json=BODY, headers=_auth(tokens, "portal-b", **{"Idempotency-Key": key}))
    assert replay.status_code == 409 and request_id not in replay.text
    again = client.post(BASE, json=BODY, headers=_auth(tokens, "portal-a", **{"Idempotency-Key": key}))
    assert again.status_code == 202 and again.json()["id"] == request_id


def test_review_tickets_are_issued_to_reviewers_only(client_and_tokens, settings: Settings) -> None:  # noqa: ANN001
    client, tokens = client_and_tokens
    request_id = client.post(BASE, json=BODY, headers=_auth(tokens, "portal-a", **{"Idempotency-Key": "t-1"})).json()["id"]
    body = {"decisions": [{"match_ref": "1/rec-9", "decision": "erase"}]}
    assert client.post(f"{BASE}/{request_id}/review-tickets", json=body,
                       headers=_auth(tokens, "portal-a")).status_code == 403
    assert client.post(f"{BASE}/{uuid.uuid4()}/review-tickets", json=body,
                       headers=_auth(tokens, "reviewer")).status_code == 404
    issued = client.post(f"{BASE}/{request_id}/review-tickets", json=body, headers=_auth(tokens, "reviewer"))
    assert issued.status_code == 201, issued.text
    answer = issued.json()
    assert answer["reviewer"] == "token:reviewer"
    assert verify_review_ticket(settings.secret_key_bytes(), answer["ticket"], request_id,
                                [("1/rec-9", "erase")]) == "token:reviewer"

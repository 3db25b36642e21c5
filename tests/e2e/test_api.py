"""The HTTP API and the request/token commands as clients use them: the real
FastAPI app on SQLite and PostgreSQL, a real uvicorn server for concurrency."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import typer
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from api.app import create_app
from api.cli_requests import register_commands
from db.lineage import ensure_dataset
from db.requests import ErasureRequest, issue_token, revoke_token
from db.session import make_engine, unit_of_work, upgrade_to_head
from db.settings import Settings
from pipeline.lifecycle import transition
from tests.conftest import TEST_SECRET, database_dump
from tests.prefect_server import api_server

BASE = "/v1/erasure-requests"
BODY = {"identifiers": [{"kind": "email", "value": "Jane.Doe@example.org"}], "samples": ["my kettle review"]}


@dataclass
class Api:
    client: TestClient
    settings: Settings
    tokens: dict[str, str]  # scope (or "revoked") -> bearer token

    def auth(self, who: str, **headers: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}", **headers}

    def submit(self, key: str | None = None, body: dict | None = None) -> httpx.Response:
        headers = self.auth("intake", **{"Idempotency-Key": key or str(uuid.uuid4())})
        return self.client.post(BASE, json=BODY if body is None else body, headers=headers)

    def move(self, request_id: str, *states: str) -> None:
        with unit_of_work(self.client.app.state.engine) as session:
            for state in states:
                transition(session, request_id, state, actor="test-flow")


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    app = create_app(settings)
    tokens = {}
    with unit_of_work(app.state.engine) as session:
        for scope in ("intake", "review", "audit", "screen", "generate", "admin"):
            tokens[scope], _ = issue_token(session, f"{scope}-client", [scope])
        tokens["revoked"], _ = issue_token(session, "old-client", ["admin"])
        revoke_token(session, "old-client")
    with TestClient(app) as client:
        yield Api(client, settings, tokens)


class ResponseStartProbe:
    """ASGI wrapper running ``check`` the moment the app starts its answer:
    what ``check`` reads through its own connection was committed before the
    client could hear back."""

    def __init__(self, app, check) -> None:  # noqa: ANN001
        self.app, self.check, self.seen = app, check, []

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        async def probing_send(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                self.seen.append(self.check())
            await send(message)

        await self.app(scope, receive, probing_send)


def read_committed(url: str, column):  # noqa: ANN001, ANN201
    """A reader through a new engine: the values of ``column`` over all requests."""
    def read() -> list:
        engine = make_engine(url)
        try:
            with unit_of_work(engine) as session:
                return list(session.scalars(select(column)))
        finally:
            engine.dispose()
    return read


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "fields"} <= set(body["error"]), body
    return body["error"]


# ---------------------------------------------------------------- auth on every route


def test_every_route_needs_a_token_with_its_scope(api: Api) -> None:
    request_id = api.submit().json()["id"]
    api.move(request_id, "locating")
    with unit_of_work(api.client.app.state.engine) as session:  # a dataset without tombstones, to screen against
        ensure_dataset(session, name="screened", seed=0, n_shards=1, n_slices=1, feature_dim=8, embedder="hashing",
                       key_id="test")
    routes = {  # (method, path) -> (scopes admitted, body)
        ("post", BASE): (("intake",), BODY),
        ("get", f"{BASE}/{{request_id}}"): (("intake", "review", "audit"), None),
        ("post", f"{BASE}/{{request_id}}/review-decisions"): (("review",), {"decisions": [{"match_ref": "m1", "decision": "keep"}]}),
        ("post", f"{BASE}/{{request_id}}/review-tickets"): (("review",), {"decisions": [{"match_ref": "m1", "decision": "keep"}]}),
        ("post", f"{BASE}/{{request_id}}/extension"): (("review",), {"months": 1, "reason": "complex case"}),
        ("post", f"{BASE}/{{request_id}}/denial"): (("review",), {"ground": "legal_claims", "detail": "litigation hold"}),
        ("post", "/v1/screen"): (("screen",), {"dataset": "screened", "texts": ["some model output"]}),
        ("post", "/v1/generate"): (("generate",), {"dataset": "screened", "prompt": "some prompt"}),
        ("post", "/v1/predict"): (("generate",), {"dataset": "screened", "texts": ["some text"]}),
    }
    # authorised, these answer 409: the dataset has no trained ensemble (tests/e2e/test_generate_api.py serves one)
    untrained = {("post", "/v1/generate"), ("post", "/v1/predict")}
    openapi = api.client.get("/openapi.json").json()
    published = {(method, path) for path, item in openapi["paths"].items() for method in item
                 if not path.startswith("/v1/audit/")}  # those: tests/e2e/test_audit_api.py
    assert published == set(routes), "a route was added: add it to this test"
    assert "HTTPBearer" in openapi["components"]["securitySchemes"]

    for (method, template), (scopes, body) in routes.items():
        url = template.format(request_id=request_id)
        def call(headers: dict[str, str]) -> httpx.Response:
            # a new key per call: a key replayed by another token is a conflict (it never hands out their request)
            extra = {"Idempotency-Key": str(uuid.uuid4())} if template == BASE else {}
            return api.client.request(method, url, json=body, headers={**extra, **headers})

        for headers in ({}, {"Authorization": "Bearer er_not-a-token"}, {"Authorization": "Basic dXNlcjpwdw=="},
                        api.auth("revoked")):
            response = call(headers)
            assert response.status_code == 401, (method, url, headers, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert error_of(response)["code"] == "unauthorized"
        for scope in ("intake", "review", "audit", "screen", "generate"):
            if scope in scopes:
                continue
            response = call(api.auth(scope))
            assert response.status_code == 403, (method, url, scope, response.text)
            assert f"lacks the scope {scopes[0]!r}" in error_of(response)["message"]
        for scope in (*scopes, "admin"):
            response = call(api.auth(scope))
            expected = (409,) if (method, template) in untrained else (200, 201, 202)
            assert response.status_code in expected, (method, url, scope, response.text)
            if template.endswith("/denial"):
                break  # a request is denied once
    # no token and an invalid body: the missing token is reported first
    assert api.client.post(BASE, json={"identifiers": "nope"}).status_code == 401


# ---------------------------------------------------------------- intake


def test_submit_show_and_idempotency(api: Api) -> None:
    first = api.submit(key="client-key-1")
    assert first.status_code == 202
    accepted = first.json()
    assert set(accepted) == {"id", "received_at", "due_at", "status_url"}
    assert uuid.UUID(accepted["id"]) and first.headers["Location"] == accepted["status_url"]
    assert "Idempotent-Replayed" not in first.headers

    # committed before the answer starts: another connection sees it then
    probe = ResponseStartProbe(api.client.app, read_committed(api.settings.resolved_database_url, ErasureRequest.id))
    probed = TestClient(probe).post(BASE, json=BODY, headers=api.auth("intake", **{"Idempotency-Key": "probe"}))
    assert probed.status_code == 202 and len(probe.seen) == 1
    assert sorted(probe.seen[0]) == sorted([accepted["id"], probed.json()["id"]])

    respelled = {"identifiers": [{"kind": "email", "value": " JANE.DOE@EXAMPLE.ORG"}], "samples": ["my kettle review"]}
    again = api.submit(key="client-key-1", body=respelled)
    assert again.status_code == 202 and again.json() == accepted
    assert again.headers["Idempotent-Replayed"] == "true"

    conflict = api.submit(key="client-key-1", body={"samples": ["something else"]})
    assert conflict.status_code == 409 and error_of(conflict)["code"] == "idempotency_conflict"

    missing = api.client.post(BASE, json=BODY, headers=api.auth("intake"))
    assert missing.status_code == 422
    assert error_of(missing)["fields"] == [{"location": "header", "field": "Idempotency-Key", "message": "Field required"}]

    shown = api.client.get(accepted["status_url"], headers=api.auth("audit"))
    assert shown.status_code == 200
    status = shown.json()
    assert (status["id"], status["state"], status["due_at"]) == (accepted["id"], "received", accepted["due_at"])
    assert status["identifier_kinds"] == {"email": 1} and status["sample_count"] == 1
    assert status["history"][0]["actor"] == "token:intake-client"
    assert "jane" not in shown.text.casefold() and "kettle" not in shown.text  # nothing submitted is echoed
    assert "jane.doe" not in database_dump(api.settings.resolved_database_url).casefold()

    assert api.submit(key="client-key-2").json()["id"] != accepted["id"]
    missing_request = api.client.get(f"{BASE}/{uuid.uuid4()}", headers=api.auth("intake"))
    assert missing_request.status_code == 404 and error_of(missing_request)["code"] == "not_found"


MALFORMED = [
    ({"identifiers": [{"kind": "ssn", "value": "123"}]}, "identifiers.0.kind", "'email', 'user_id', 'name' or 'phone'"),
    ({"identifiers": [{"kind": "email", "value": "no-at-sign"}]}, "identifiers.0.value", "not an email address"),
    ({"identifiers": [{"kind": "phone", "value": "12"}]}, "identifiers.0.value", "at least 6 digits"),
    ({"identifiers": [{"kind": "email"}]}, "identifiers.0.value", "Field required"),
    ({"identifiers": [{"kind": "email", "value": 42}]}, "identifiers.0.value", "valid string"),
    ({"identifiers": {"kind": "email"}}, "identifiers", "valid list"),
    ({}, "samples", "at least one identifier or one sample"),
    ({"identifiers": [], "samples": []}, "samples", "at least one identifier or one sample"),
    ({"samples": ["   "]}, "samples.0", "not only whitespace"),
    ({"samples": ["x" * 20_001]}, "samples.0", "at most 20000 characters"),
    ({"samples": ["x"] * 21}, "samples", "at most 20 items"),
    ({"samples": ["x"], "subject": "Jane"}, "subject", "Extra inputs are not permitted"),
]


def test_malformed_bodies_are_422_naming_the_field(api: Api) -> None:
    for body, field, message in MALFORMED:
        response = api.submit(body=body)
        assert response.status_code == 422, (body, response.text)
        error = error_of(response)
        assert error["code"] == "validation_error"
        assert [(f["location"], f["field"]) for f in error["fields"]] == [("body", field)], error
        assert message in error["fields"][0]["message"] and field in error["message"]
        assert "no-at-sign" not in response.text  # values are not echoed
    headers = api.auth("intake", **{"Idempotency-Key": "k", "Content-Type": "application/json"})
    broken = api.client.post(BASE, content=b'{"samples": [', headers=headers)
    assert broken.status_code == 422 and "invalid JSON" in error_of(broken)["fields"][0]["message"]
    bad_key = api.client.post(BASE, json=BODY, headers=api.auth("intake", **{"Idempotency-Key": "x" * 201}))
    assert error_of(bad_key)["fields"][0]["field"] == "Idempotency-Key"
    bad_id = api.client.get(f"{BASE}/not-a-uuid", headers=api.auth("intake"))
    assert bad_id.status_code == 422 and error_of(bad_id)["fields"][0]["field"] == "request_id"
    with unit_of_work(api.client.app.state.engine) as session:
        assert session.scalar(select(func.count()).select_from(ErasureRequest)) == 0


def test_oversize_bodies_are_413(api: Api) -> None:
    # 20 samples of 20,000 characters are each valid, but together exceed 256 KiB
    big = {"samples": ["x" * 20_000] * 20}
    response = api.submit(body=big)
    assert response.status_code == 413 and error_of(response)["code"] == "payload_too_large"
    assert "256 KiB" in error_of(response)["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"samples": ["'
        for _ in range(300):
            yield b"y" * 1024
        yield b'"]}'

    headers = api.auth("intake", **{"Idempotency-Key": "stream", "Content-Type": "application/json"})
    streamed = api.client.post(BASE, content=chunks(), headers=headers)
    assert streamed.status_code == 413 and error_of(streamed)["code"] == "payload_too_large"
    assert api.submit(body={"samples": ["x" * 20_000] * 5}).status_code == 202  # below the limit
    with unit_of_work(api.client.app.state.engine) as session:
        assert session.scalar(select(func.count()).select_from(ErasureRequest)) == 1


# ---------------------------------------------------------------- decisions


def test_review_extension_and_denial_over_http(api: Api) -> None:
    request_id = api.submit().json()["id"]
    url = f"{BASE}/{request_id}"
    review = api.auth("review")

    too_early = api.client.post(f"{url}/review-decisions", json={"decisions": [{"match_ref": "m1", "decision": "erase"}]},
                                headers=review)
    assert too_early.status_code == 409 and error_of(too_early)["code"] == "state_conflict"
    api.move(request_id, "locating", "awaiting_review")
    decided = api.client.post(f"{url}/review-decisions", headers=review, json={"decisions": [
        {"match_ref": "shop:rec-7", "decision": "erase"}, {"match_ref": "shop:rec-9", "decision": "keep", "note": "namesake"}]})
    assert decided.status_code == 200
    assert [(d["match_ref"], d["decision"]) for d in decided.json()["review_decisions"]] == [
        ("shop:rec-7", "erase"), ("shop:rec-9", "keep")]
    bad_decision = api.client.post(f"{url}/review-decisions", headers=review,
                                   json={"decisions": [{"match_ref": "m", "decision": "maybe"}]})
    assert error_of(bad_decision)["fields"][0]["field"] == "decisions.0.decision"

    for body, field in (({"months": 1}, "reason"), ({"months": 1, "reason": "  "}, "reason"),
                        ({"months": 3, "reason": "x"}, "months"), ({"months": 0, "reason": "x"}, "months")):
        response = api.client.post(f"{url}/extension", json=body, headers=review)
        assert response.status_code == 422 and error_of(response)["fields"][0]["field"] == field, response.text
    probe = ResponseStartProbe(api.client.app,
                               read_committed(api.settings.resolved_database_url, ErasureRequest.extension_months))
    extended = TestClient(probe).post(f"{url}/extension", json={"months": 2, "reason": "data in 12 datasets"},
                                      headers=review)
    assert extended.status_code == 200 and probe.seen == [[2]]  # committed before the answer
    status = extended.json()
    assert status["extension_months"] == 2 and status["due_at"] > status["original_due_at"]
    assert status["history"][-1]["actor"] == "token:review-client"
    more = api.client.post(f"{url}/extension", json={"months": 1, "reason": "still more"}, headers=review)
    assert more.status_code == 409 and "at most 2" in error_of(more)["message"]

    bad_ground = api.client.post(f"{url}/denial", json={"ground": "cost", "detail": "x"}, headers=review)
    assert bad_ground.status_code == 422 and error_of(bad_ground)["fields"][0]["field"] == "ground"
    no_detail = api.client.post(f"{url}/denial", json={"ground": "legal_claims"}, headers=review)
    assert error_of(no_detail)["fields"][0]["field"] == "detail"
    denied = api.client.post(f"{url}/denial", json={"ground": "archiving_research", "detail": "national archive"},
                             headers=review)
    assert denied.status_code == 200
    assert (denied.json()["state"], denied.json()["denial_ground"]) == ("denied", "archiving_research")
    assert denied.json()["samples_purged_at"] is not None
    again = api.client.post(f"{url}/denial", json={"ground": "legal_claims", "detail": "x"}, headers=review)
    assert again.status_code == 409 and error_of(again)["code"] == "illegal_transition"
    missing = api.client.post(f"{BASE}/{uuid.uuid4()}/extension", json={"months": 1, "reason": "x"}, headers=review)
    assert missing.status_code == 404


# ---------------------------------------------------------------- a real server, concurrently


def cli_env(home: Path, database_url: str) -> dict[str, str]:
    env = {**os.environ, "ERASURE_HOME": str(home), "ERASURE_DATABASE_URL": database_url,
           "ERASURE_SECRET_KEY": TEST_SECRET}
    return env


@pytest.mark.postgres
@pytest.mark.parametrize("workers", [1, 2])
def test_fifty_concurrent_submissions_on_a_real_server(tmp_path: Path, postgres_url: str, workers: int) -> None:
    upgrade_to_head(postgres_url)
    engine = make_engine(postgres_url)
    with unit_of_work(engine) as session:
        token, _ = issue_token(session, "load", ["intake"])
    try:
        with api_server(cli_env(tmp_path / "home", postgres_url), tmp_path / "api.log", workers=workers,
                        timeout_s=30) as base:
            start = threading.Barrier(50)

            def submit(i: int, key: str | None = None) -> httpx.Response:
                start.wait(timeout=30)
                body = {"identifiers": [{"kind": "user_id", "value": f"user-{i}"}], "samples": [f"sample {i}"]}
                headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key or f"load-{i}"}
                return httpx.post(f"{base}{BASE}", json=body, headers=headers, timeout=60)

            with ThreadPoolExecutor(max_workers=50) as pool:
                responses = list(pool.map(submit, range(50)))
            assert [r.status_code for r in responses] == [202] * 50, [r.text for r in responses if r.status_code != 202]
            assert len({r.json()["id"] for r in responses}) == 50

            start = threading.Barrier(10)
            with ThreadPoolExecutor(max_workers=10) as pool:  # one key, ten times at once
                same = list(pool.map(lambda _: submit(0, key="one-key"), range(10)))
            assert [r.status_code for r in same] == [202] * 10
            assert len({r.json()["id"] for r in same}) == 1

            def oversize() -> Iterator[bytes]:  # streamed (chunked) past 256 KiB
                yield b'{"samples": ["'
                for _ in range(300):
                    yield b"z" * 1024
                yield b'"]}'

            streamed = httpx.post(f"{base}{BASE}", content=oversize(), timeout=30, headers={
                "Authorization": f"Bearer {token}", "Idempotency-Key": "big", "Content-Type": "application/json"})
            assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"

            with unit_of_work(engine) as session:
                assert session.scalar(select(func.count()).select_from(ErasureRequest)) == 51
    finally:
        engine.dispose()


# ---------------------------------------------------------------- the commands


def test_request_and_token_commands(tmp_path: Path, database_url: str) -> None:
    app = typer.Typer()
    register_commands(app)  # as api/cli.py mounts them
    runner = CliRunner()
    common = ["--home", str(tmp_path / "home"), "--database-url", database_url]

    def run(*args: str, code: int = 0, stdin: str | None = None):
        result = runner.invoke(app, [*args, *common], env={"ERASURE_SECRET_KEY": TEST_SECRET}, input=stdin)
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        return result

    created = json.loads(run("token", "create", "--name", "portal", "--scope", "intake", "--scope", "review",
                             "--json").stdout)
    assert created["token"].startswith("er_") and created["scopes"] == ["intake", "review"]
    assert created["token"] not in database_dump(database_url)
    assert "unknown scope(s): root" in run("token", "create", "--name", "x", "--scope", "root", code=2).stderr

    submitted = json.loads(run("request", "submit", "-i", "email:jane@example.org", "-i", "user_id:u-17",
                               "--sample", "my kettle review", "--idempotency-key", "cli-1", "--json").stdout)
    assert submitted["replayed"] is False and submitted["status_url"].endswith(submitted["id"])
    again = json.loads(run("request", "submit", "--body", "-", "--idempotency-key", "cli-1", "--json", stdin=json.dumps(
        {"identifiers": [{"kind": "user_id", "value": "u-17"}, {"kind": "email", "value": "JANE@example.org"}],
         "samples": ["my kettle review"]})).stdout)
    assert (again["id"], again["replayed"]) == (submitted["id"], True)
    assert "different body" in run("request", "submit", "-i", "email:a@b.c", "--idempotency-key", "cli-1",
                                   code=2).stderr
    assert "'ssn' is not an identifier kind" in run("request", "submit", "-i", "ssn:1", code=2).stderr
    assert "write KIND=VALUE or KIND:VALUE" in run("request", "submit", "-i", "jane@example.org", code=2).stderr
    assert "at least one identifier or one sample" in run("request", "submit", code=2).stderr

    request_id = submitted["id"]
    extended = json.loads(run("request", "extend", request_id, "--months", "1", "--reason", "complex", "--json",
                              "--actor", "dpo").stdout)
    assert extended["extension_months"] == 1 and extended["history"][-1]["actor"] == "dpo"
    assert "needs a reason" in run("request", "extend", request_id, "--months", "1", code=2).stderr
    assert "review decisions are taken while" in run("request", "review", request_id, "--erase", "m1", code=2).stderr
    with unit_of_work(make_engine(database_url)) as session:
        transition(session, request_id, "locating", actor="flow")
    reviewed = json.loads(run("request", "review", request_id, "--erase", "m1", "--keep", "m2", "--json").stdout)
    assert {d["match_ref"]: d["decision"] for d in reviewed["review_decisions"]} == {"m1": "erase", "m2": "keep"}
    assert "unknown Art. 17(3) ground 'cost'" in run("request", "deny", request_id, "--ground", "cost",
                                                      "--detail", "x", code=2).stderr
    denied = json.loads(run("request", "deny", request_id, "--ground", "legal_obligation", "--detail",
                            "tax records must be kept 10 years", "--json").stdout)
    assert denied["state"] == "denied" and denied["denial_detail"] == "tax records must be kept 10 years"
    shown = json.loads(run("request", "show", request_id, "--json").stdout)
    assert shown == {**denied, "overdue": shown["overdue"]}
    assert "no erasure request with id nope" in run("request", "show", "nope", code=2).stderr
    run("token", "revoke", "portal")
    listed = json.loads(run("token", "list", "--json").stdout)["tokens"]
    assert [(t["name"], t["revoked_at"] is not None) for t in listed] == [("portal", True)]


def test_a_revoked_token_stops_working_within_the_cache_time(api: Api) -> None:
    from api.deps import TokenCache

    api.client.app.state.token_cache = TokenCache(0.3)
    with unit_of_work(api.client.app.state.engine) as session:
        token, _ = issue_token(session, "short-lived", ["intake"])
    headers = {"Authorization": f"Bearer {token}"}
    own = api.client.post(BASE, json=BODY, headers={**headers, "Idempotency-Key": str(uuid.uuid4())}).json()["id"]
    assert api.client.get(f"{BASE}/{own}", headers=headers).status_code == 200  # an intake token sees its own
    with unit_of_work(api.client.app.state.engine) as session:
        revoke_token(session, "short-lived")
    time.sleep(0.4)
    response = api.client.post(BASE, json=BODY, headers={**headers, "Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 401
    assert error_of(response)["code"] == "unauthorized"

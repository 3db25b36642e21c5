"""The /v1/audit routes as a client uses them: the real FastAPI app on SQLite and
PostgreSQL, bearer tokens by scope, the error answers' shape."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from db.lineage import ensure_dataset
from db.models import utcnow
from db.requests import issue_token
from db.session import unit_of_work
from db.settings import Settings
from db.training import Checkpoint, EnsembleMemberRow, EnsembleVersionRow
from dedup.minhash import minhash_signatures
from dedup.tombstones import TombstoneSet
from pipeline.lifecycle import submit_request
from pipeline.locate import dataset_minhash, tombstone_path
from pipeline.screening import screen_reference
from shards.files import write_atomically

BASE = "/v1/audit"
EMAIL = "Jane.Doe@example.org"
VERSION = "ab" * 32


@dataclass
class Audit:
    client: TestClient
    tokens: dict[str, str]
    request_id: str
    screen_reference: str  # of a tombstone of the request (what a /v1/screen answer gives)

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def call(self, method: str, path: str, who: str | None = "audit", body: dict | None = None) -> httpx.Response:
        headers = self.auth(who) if who else {}
        return self.client.request(method, path, json=body, headers=headers)


@pytest.fixture
def audit(settings: Settings) -> Iterator[Audit]:
    """The app over a database with one overdue request and one ensemble version."""
    app = create_app(settings)
    engine = app.state.engine
    tokens = {}
    with unit_of_work(engine) as session:
        for scope in ("intake", "review", "audit", "screen", "admin"):
            tokens[scope], _ = issue_token(session, f"{scope}-client", [scope])
    request_id = submit_request(engine, settings.secret_key_bytes(), idempotency_key="k1",
                                identifiers=[("email", EMAIL)], samples=[], actor="test",
                                now=utcnow() - timedelta(days=40)).request_id
    with unit_of_work(engine) as session:
        dataset = ensure_dataset(session, name="demo", seed=0, n_shards=1, n_slices=1, feature_dim=8,
                                 embedder="hashing", key_id="test")
        session.add(Checkpoint(dataset_id=dataset.id, key="c" * 64, shard=0, slice=0, shard_version=1, path="/x",
                               sha256="0" * 64, records_seen=0))
        session.flush()
        version = EnsembleVersionRow(dataset_id=dataset.id, version_id=VERSION, manifest_path="/x.json",
                                     created_by="train")
        session.add(version)
        session.flush()
        session.add(EnsembleMemberRow(ensemble_id=version.id, shard=0, dataset_id=dataset.id, checkpoint_key="c" * 64))
    params = dataset_minhash(settings, "demo")
    tombstone_key = f"{request_id}/0/rec-1"
    write_atomically(tombstone_path(settings, "demo"), TombstoneSet.empty(params).added(
        minhash_signatures(["an erased text of some length here"], params), [tombstone_key], params).to_bytes())
    reference = screen_reference(settings.secret_key_bytes(), "demo", tombstone_key)
    with TestClient(app) as client:
        yield Audit(client, tokens, request_id, reference)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "fields"} <= set(body["error"]), body
    return body["error"]


def _routes(request_id: str, reference: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("get", f"{BASE}/screen-references/{reference}", None),
        ("get", f"{BASE}/requests/{request_id}/timeline", None),
        ("get", f"{BASE}/requests/{request_id}/residue?prefect=false", None),
        ("get", f"{BASE}/requests/due?within_days=7", None),
        ("post", f"{BASE}/subject", {"identifiers": [{"kind": "email", "value": EMAIL}]}),
        ("get", f"{BASE}/ensembles/{VERSION}", None),
    ]


def test_every_audit_route_needs_the_audit_scope(audit: Audit) -> None:
    openapi = audit.client.get("/openapi.json").json()
    published = {(m, p) for p, item in openapi["paths"].items() for m in item if p.startswith(BASE)}
    tested = {(m, p.split("?")[0].replace(audit.request_id, "{request_id}").replace(VERSION, "{version_id}")
               .replace(audit.screen_reference, "{reference}"))
              for m, p, _ in _routes(audit.request_id, audit.screen_reference)}
    assert published == tested, "an audit route was added: add it to _routes"
    for method, path, body in _routes(audit.request_id, audit.screen_reference):
        missing = audit.call(method, path, None, body)
        assert missing.status_code == 401 and error_of(missing)["code"] == "unauthorized", path
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        for scope in ("intake", "review", "screen"):
            refused = audit.call(method, path, scope, body)
            assert refused.status_code == 403, (path, scope)
            assert "audit" in error_of(refused)["message"]
        for scope in ("audit", "admin"):
            assert audit.call(method, path, scope, body).status_code == 200, (path, scope)


def test_answers(audit: Audit) -> None:
    timeline = audit.call("get", f"{BASE}/requests/{audit.request_id}/timeline").json()
    assert timeline["request_id"] == audit.request_id and timeline["overdue"]
    assert timeline["entries"][0]["kind"] == "request.submitted" and timeline["entries"][0]["to_state"] == "received"

    due = audit.call("get", f"{BASE}/requests/due?within_days=0").json()
    assert [r["request_id"] for r in due["overdue"]] == [audit.request_id] and due["due_soon"] == []
    assert due["overdue"][0]["days_left"] < -8

    answer = audit.call("post", f"{BASE}/subject", body={"identifiers": [{"kind": "email", "value": EMAIL}],
                                                          "dataset": "demo"})
    data = answer.json()
    assert data["requests"] == [audit.request_id] and data["records"] == [] and data["identifiers"] == 1
    assert "jane" not in answer.text.lower()  # the identifier never comes back

    ensemble = audit.call("get", f"{BASE}/ensembles/{VERSION}?dataset=demo").json()
    assert ensemble["version_id"] == VERSION and ensemble["is_current"] and ensemble["lineage"] == [VERSION]
    assert ensemble["reflected"] == [] and ensemble["still_holding"] == []


@pytest.mark.parametrize("body, field", [
    ({}, "identifiers"),
    ({"identifiers": []}, "identifiers"),
    ({"identifiers": [{"kind": "passport", "value": "X1"}]}, "identifiers.0.kind"),
    ({"identifiers": [{"kind": "email", "value": "no-at-sign"}]}, "identifiers.0.value"),
    ({"identifiers": [{"kind": "email", "value": EMAIL}], "dataset": "../etc"}, "dataset"),
    ({"identifiers": [{"kind": "email", "value": EMAIL}], "extra": 1}, "extra"),
])
def test_malformed_subject_body_is_422(audit: Audit, body: dict, field: str) -> None:
    answer = audit.call("post", f"{BASE}/subject", body=body)
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["code"] == "validation_error" and field in {f["field"] for f in error["fields"]}, error
    assert "no-at-sign" not in answer.text  # values are not echoed


def test_malformed_json_and_query_are_422(audit: Audit) -> None:
    raw = audit.client.post(f"{BASE}/subject", content=b"{not json", headers={
        **audit.auth("audit"), "Content-Type": "application/json"})
    assert raw.status_code == 422
    for path in (f"{BASE}/requests/due?within_days=-1", f"{BASE}/requests/due?within_days=abc",
                 f"{BASE}/requests/not-a-uuid/timeline", f"{BASE}/ensembles/NOT-HEX"):
        answer = audit.call("get", path)
        assert answer.status_code == 422 and error_of(answer)["code"] == "validation_error", path


def test_unknown_things_are_404(audit: Audit) -> None:
    for method, path, body in [
        ("get", f"{BASE}/requests/{uuid.uuid4()}/timeline", None),
        ("get", f"{BASE}/ensembles/{'cd' * 32}", None),
        ("get", f"{BASE}/ensembles/{VERSION}?dataset=other", None),
        ("post", f"{BASE}/subject", {"identifiers": [{"kind": "email", "value": EMAIL}], "dataset": "other"}),
    ]:
        answer = audit.call(method, path, body=body)
        assert answer.status_code == 404, path
        assert error_of(answer)["code"] == "not_found" and error_of(answer)["message"]

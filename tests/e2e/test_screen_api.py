"""POST /v1/screen as a client uses it: texts screened against the tombstones
of erased records of an ingested dataset, never echoed, logged or stored."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from db.requests import issue_token
from db.session import unit_of_work
from db.settings import Settings
from dedup.minhash import minhash_signatures
from dedup.tombstones import DEFAULT_SCREEN_JACCARD, TombstoneSet
from api.demo import DEMO_FIELDS
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.locate import dataset_minhash, tombstone_path
from pipeline.screening import (
    MAX_SCREEN_TEXT_CHARS,
    MAX_SCREEN_TEXTS,
    SCREEN_NOTE,
    resolve_screen_reference,
    screen_texts,
)
from shards.files import write_atomically
from shards.demo_data import write_demo
from tests.conftest import database_dump

URL = "/v1/screen"
REQUEST_1 = "3f2b8c1a-9d4e-4f6a-8b7c-0e1d2c3b4a51"
REQUEST_2 = "7c6d5e4f-3a2b-4c1d-9e8f-a0b1c2d3e4f5"
REQUEST_9 = "9e9e9e9e-1111-4222-8333-444455556666"
UNRELATED = "the quarterly maintenance window for the cooling towers moves to the second tuesday of next month"


@dataclass
class ScreenApi:
    client: TestClient
    settings: Settings
    tokens: dict[str, str]
    erased: list[str]  # texts of the erased records
    erased_ids: list[str]  # their record ids
    kept: list[str]  # texts of records that stay

    def post(self, body: dict, who: str = "screen") -> httpx.Response:
        return self.client.post(URL, json=body, headers={"Authorization": f"Bearer {self.tokens[who]}"})


def _write_tombstones(settings: Settings, dataset: str, texts: list[str], keys: list[str]) -> None:
    """Tombstones as an erasure writes them: keyed signatures, keys "<request id>/<shard>/<record id>"."""
    params = dataset_minhash(settings, dataset)
    write_atomically(tombstone_path(settings, dataset),
                     TombstoneSet.empty(params).added(minhash_signatures(texts, params), keys, params).to_bytes())


def _ingest(settings: Settings, tmp_path: Path, dataset: str) -> list[dict]:
    files = write_demo(tmp_path / "demo", 300, seed=5)
    ingest_source_file(files.records, IngestOptions(dataset=dataset, fields=DEMO_FIELDS, n_shards=2, n_slices=2),
                       settings)
    return [json.loads(line) for line in files.records.read_text().splitlines()]


@pytest.fixture
def screen_api(sqlite_settings: Settings, tmp_path: Path) -> Iterator[ScreenApi]:
    rows = _ingest(sqlite_settings, tmp_path, "demo")
    rows = [r for r in rows if len(r["text"].split()) >= 12]
    erased, kept = rows[:3], rows[3:6]
    _write_tombstones(sqlite_settings, "demo", [r["text"] for r in erased],
                      [f"{REQUEST_1}/0/{erased[0]['id']}", f"{REQUEST_1}/1/{erased[1]['id']}",
                       f"{REQUEST_2}/0/{erased[2]['id']}"])
    app = create_app(sqlite_settings)
    tokens = {}
    with unit_of_work(app.state.engine) as session:
        for scope in ("intake", "review", "audit", "screen", "admin"):
            tokens[scope], _ = issue_token(session, f"{scope}-client", [scope])
    with TestClient(app) as client:
        yield ScreenApi(client, sqlite_settings, tokens, [r["text"] for r in erased], [r["id"] for r in erased],
                        [r["text"] for r in kept])


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "fields"} <= set(body["error"]), body
    return body["error"]


def test_erased_text_matches_and_unrelated_text_does_not(screen_api: ScreenApi, caplog: pytest.LogCaptureFixture) -> None:
    texts = [screen_api.erased[0], UNRELATED, screen_api.erased[2].upper() + " !!", screen_api.kept[0], ""]
    with caplog.at_level(logging.DEBUG):
        response = screen_api.post({"dataset": "demo", "texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"dataset", "results", "tombstones", "note"}
    assert body["dataset"] == "demo" and body["tombstones"] == 3 and body["note"] == SCREEN_NOTE
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(texts)))
    assert [r["matches_erased_content"] for r in results] == [True, False, True, False, False]
    assert results[0]["best_estimated_jaccard"] == pytest.approx(1.0)
    assert results[2]["best_estimated_jaccard"] >= 0.8
    assert re.fullmatch(r"scr_[0-9a-f]{32}", results[0]["reference"]) and results[0]["reference"] != results[2]["reference"]
    for r in results[1:2] + results[3:]:
        assert r["best_estimated_jaccard"] is None and r["reference"] is None
    assert set(results[0]) == {"index", "matches_erased_content", "best_estimated_jaccard", "reference"}
    # the texts are never echoed, logged or stored
    for text in texts[:4]:
        assert text not in response.text
        assert text.lower()[:40] not in response.text.lower()
        assert all(text[:40] not in record.getMessage() for record in caplog.records)
        assert text[:40] not in database_dump(screen_api.settings.resolved_database_url)


def test_admin_may_screen_and_other_scopes_may_not(screen_api: ScreenApi) -> None:
    body = {"dataset": "demo", "texts": [screen_api.erased[1]]}
    assert screen_api.post(body, "admin").json()["results"][0]["matches_erased_content"] is True
    for scope in ("intake", "review", "audit"):
        response = screen_api.post(body, scope)
        assert response.status_code == 403, (scope, response.text)
        error = error_of(response)
        assert error["code"] == "forbidden" and "lacks the scope 'screen'" in error["message"]
        assert screen_api.erased[1][:40] not in response.text
    for headers in ({}, {"Authorization": "Bearer er_not-a-token"}):
        response = screen_api.client.post(URL, json=body, headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # no token and an invalid body: the missing token is reported first
    assert screen_api.client.post(URL, json={"texts": []}).status_code == 401


def test_invalid_bodies_are_422_without_echoing_texts(screen_api: ScreenApi) -> None:
    secret = "a very private sentence that must never come back " * 3
    cases = {
        "texts": {"dataset": "demo", "texts": []},
        "texts.0": {"dataset": "demo", "texts": [secret + "x" * MAX_SCREEN_TEXT_CHARS]},
        "min_jaccard": {"dataset": "demo", "texts": [secret], "min_jaccard": 1.0},
        "dataset": {"dataset": "../etc", "texts": [secret]},
    }
    for field, body in cases.items():
        response = screen_api.post(body)
        assert response.status_code == 422, (field, response.text)
        error = error_of(response)
        assert error["code"] == "validation_error"
        assert field in [f["field"] for f in error["fields"]], (field, error)
        assert secret[:30] not in response.text
    too_many = screen_api.post({"dataset": "demo", "texts": ["short text"] * (MAX_SCREEN_TEXTS + 1)})
    assert too_many.status_code == 422 and error_of(too_many)["fields"][0]["field"] == "texts"
    assert screen_api.post({"dataset": "demo", "texts": ["short text"] * MAX_SCREEN_TEXTS}).status_code == 200
    assert screen_api.post({"dataset": "demo", "texts": ["x"], "extra": 1}).status_code == 422
    assert screen_api.post({"dataset": "demo", "texts": "not a list"}).status_code == 422


def test_unknown_dataset_is_404_and_min_jaccard_is_honoured(screen_api: ScreenApi) -> None:
    response = screen_api.post({"dataset": "nope", "texts": [screen_api.erased[0]]})
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    assert "nope" in error_of(response)["message"] and screen_api.erased[0][:40] not in response.text
    # a light edit: matches at a low threshold, not at a very high one
    edited = screen_api.erased[0] + " and then some more words appended at the very end of it"
    loose = screen_api.post({"dataset": "demo", "texts": [edited], "min_jaccard": 0.3}).json()["results"][0]
    strict = screen_api.post({"dataset": "demo", "texts": [edited], "min_jaccard": 0.99}).json()["results"][0]
    assert loose["matches_erased_content"] is True and loose["best_estimated_jaccard"] < 0.99
    assert strict["matches_erased_content"] is False and strict["best_estimated_jaccard"] is None


def test_a_dataset_without_tombstones_matches_nothing(settings: Settings, tmp_path: Path) -> None:
    """On both backends, through the service: no tombstone file yet -> every text false."""
    rows = _ingest(settings, tmp_path, "fresh")
    result = screen_texts(settings, "fresh", [rows[0]["text"], UNRELATED], DEFAULT_SCREEN_JACCARD)
    assert result.tombstones == 0
    assert [(r.matches_erased_content, r.best_estimated_jaccard, r.reference) for r in result.results] == [
        (False, None, None), (False, None, None)]
    # once tombstones exist (a new file replaces the cached set), the same text matches
    _write_tombstones(settings, "fresh", [rows[0]["text"]], [f"{REQUEST_9}/1/{rows[0]['id']}"])
    again = screen_texts(settings, "fresh", [rows[0]["text"], UNRELATED])
    assert again.tombstones == 1 and [r.matches_erased_content for r in again.results] == [True, False]
    resolved = resolve_screen_reference(settings, again.results[0].reference)
    assert (resolved.dataset, resolved.request_id, resolved.shard, resolved.record_id) == (
        "fresh", REQUEST_9, 1, rows[0]["id"])


def test_a_screen_answer_names_no_request_or_record_and_only_the_audit_scope_resolves_it(
        screen_api: ScreenApi) -> None:
    """The screen scope learns "blocked" and an opaque reference; the audit scope maps it back."""
    response = screen_api.post({"dataset": "demo", "texts": [screen_api.erased[1], screen_api.erased[2]]})
    assert response.status_code == 200
    raw = response.text
    for secret in (REQUEST_1, REQUEST_2, REQUEST_1.replace("-", ""), REQUEST_2.replace("-", ""),
                   *screen_api.erased_ids):
        assert secret not in raw, secret
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", raw)
    refs = [r["reference"] for r in response.json()["results"]]
    assert all(refs) and refs[0] != refs[1]
    # the same tombstone always gives the same reference
    again = screen_api.post({"dataset": "demo", "texts": [screen_api.erased[1]]}).json()["results"][0]
    assert again["reference"] == refs[0]

    url = f"/v1/audit/screen-references/{refs[0]}"
    audit = screen_api.client.get(url, headers={"Authorization": f"Bearer {screen_api.tokens['audit']}"})
    assert audit.status_code == 200, audit.text
    assert audit.json() == {"reference": refs[0], "dataset": "demo", "request_id": REQUEST_1, "shard": 1,
                            "record_id": screen_api.erased_ids[1]}
    other = screen_api.client.get(f"/v1/audit/screen-references/{refs[1]}",
                                  headers={"Authorization": f"Bearer {screen_api.tokens['audit']}"}).json()
    assert (other["request_id"], other["record_id"]) == (REQUEST_2, screen_api.erased_ids[2])
    for scope in ("screen", "intake", "review"):
        denied = screen_api.client.get(url, headers={"Authorization": f"Bearer {screen_api.tokens[scope]}"})
        assert denied.status_code == 403 and REQUEST_1 not in denied.text, (scope, denied.text)
    unknown = screen_api.client.get("/v1/audit/screen-references/scr_" + "0" * 32,
                                    headers={"Authorization": f"Bearer {screen_api.tokens['audit']}"})
    assert unknown.status_code == 404
    malformed = screen_api.client.get("/v1/audit/screen-references/request-1",
                                      headers={"Authorization": f"Bearer {screen_api.tokens['audit']}"})
    assert malformed.status_code == 422

    # the same through the CLI
    from typer.testing import CliRunner

    from api.cli import app

    settings = screen_api.settings
    out = CliRunner().invoke(app, ["audit", "screen-reference", refs[0], "--home", str(settings.home),
                                   "--database-url", settings.database_url, "--json"],
                             env={"ERASURE_SECRET_KEY": settings.secret_key.get_secret_value()})
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["request_id"] == REQUEST_1
    bad = CliRunner().invoke(app, ["audit", "screen-reference", "scr_" + "1" * 32, "--home", str(settings.home),
                                   "--database-url", settings.database_url],
                             env={"ERASURE_SECRET_KEY": settings.secret_key.get_secret_value()})
    assert bad.exit_code == 2 and "no tombstone has this screen reference" in bad.output

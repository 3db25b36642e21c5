"""POST /v1/generate and /v1/predict as a client uses them: the ensembles behind the erasure screens
(prompts refused with a reason code, outputs near erased content withheld, every screen counted)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.demo import DEMO_FIELDS
from db.audit import AuditEvent, verify_chain
from db.requests import issue_token
from db.session import unit_of_work
from db.settings import Settings
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.training import list_shards, publish_trained_members, train_one_shard
from shards.demo_data import write_demo
from tests.e2e.test_screen_api import _write_tombstones
from tests.prefect_server import demo_subject, submit_for

REQUEST = "3f2b8c1a-9d4e-4f6a-8b7c-0e1d2c3b4a51"
LM = {"epochs": 1.0, "hidden": [16], "batch_size": 32, "family": "lm", "block_size": 48}
MLP = {"epochs": 1.0, "hidden": [8], "batch_size": 64}


@dataclass
class ServingApi:
    client: TestClient
    settings: Settings
    tokens: dict[str, str]
    subject: dict
    erased_text: str

    def post(self, path: str, body: dict, who: str | None = "generate"):  # noqa: ANN201
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return self.client.post(path, json=body, headers=headers)


@pytest.fixture
def serving_api(sqlite_settings: Settings, tmp_path: Path) -> Iterator[ServingApi]:
    files = write_demo(tmp_path / "demo", 80, seed=3)
    rows = [json.loads(line) for line in files.records.read_text().splitlines()]
    for name, options in (("gen", LM), ("cls", MLP)):
        ingest_source_file(files.records, IngestOptions(dataset=name, fields=DEMO_FIELDS, n_shards=2, n_slices=2),
                           sqlite_settings)
        publish_trained_members(sqlite_settings, name, [train_one_shard(sqlite_settings, name, s, options)
                                                        for s in list_shards(sqlite_settings, name)])
    subject = demo_subject(files.ground_truth)
    submit_for(sqlite_settings, subject)  # the subject asked: their identifiers are kept as keyed hashes
    erased = next(r for r in rows if len(r["text"].split()) >= 20)
    for name in ("gen", "cls"):
        _write_tombstones(sqlite_settings, name, [erased["text"]], [f"{REQUEST}/0/{erased['id']}"])
    app = create_app(sqlite_settings)
    with unit_of_work(app.state.engine) as session:
        tokens = {scope: issue_token(session, f"{scope}-client", [scope])[0] for scope in ("generate", "screen")}
    with TestClient(app) as client:
        yield ServingApi(client, sqlite_settings, tokens, subject, erased["text"])


def _events(settings: Settings) -> list[dict]:
    from pipeline.database import open_database

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            assert verify_chain(session).ok
            return [json.loads(e.details) for e in session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "generation.screened").order_by(AuditEvent.id))]
    finally:
        engine.dispose()


def test_generate_screens_prompts_and_outputs_and_counts_them(serving_api: ServingApi) -> None:
    api = serving_api
    plain = api.post("/v1/generate", {"dataset": "gen", "prompt": "The parcel arrived", "max_words": 6})
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["refused"] is False and body["reason"] is None and body["blocked"] is False
    assert 1 <= len(body["continuation"].split()) <= 6 and body["ensemble_version"]

    by_identifier = api.post("/v1/generate", {"dataset": "gen", "prompt": f"Write to {api.subject['email']} about"})
    assert by_identifier.status_code == 200
    assert (by_identifier.json()["refused"], by_identifier.json()["reason"]) == (True, "erased_identifier")
    assert by_identifier.json()["continuation"] == ""
    near_copy = api.post("/v1/generate", {"dataset": "gen", "prompt": api.erased_text.upper()})
    assert (near_copy.json()["refused"], near_copy.json()["reason"]) == (True, "near_erased_text")

    # the output screen: make the ensemble's own (deterministic) continuation of a prompt erased content
    prompt = "Hello, I ordered"
    first = api.post("/v1/generate", {"dataset": "gen", "prompt": prompt, "max_words": 24}).json()
    assert not first["blocked"] and first["continuation"], first
    _write_tombstones(api.settings, "gen", [api.erased_text, f"{prompt} {first['continuation']}"],
                      [f"{REQUEST}/0/x1", f"{REQUEST}/0/x2"])
    again = api.post("/v1/generate", {"dataset": "gen", "prompt": prompt, "max_words": 24}).json()
    assert again["refused"] is False and again["blocked"] is True and again["continuation"] == ""

    events = _events(api.settings)
    assert [(e["refused"], e["blocked"], e["served"]) for e in events] == [
        ({}, 0, 1), ({"erased_identifier": 1}, 0, 0), ({"near_erased_text": 1}, 0, 0), ({}, 0, 1), ({}, 1, 0)]
    assert api.subject["email"] not in json.dumps(events) and prompt not in json.dumps(events)

    # the same screens through `erasure generate`
    from typer.testing import CliRunner

    from api.cli import app

    def cli(text: str):  # noqa: ANN202
        return CliRunner().invoke(app, ["generate", text, "--dataset", "gen", "--max-words", "4", "--json", "--home",
                                        str(api.settings.home), "--database-url", api.settings.database_url],
                                  env={"ERASURE_SECRET_KEY": api.settings.secret_key.get_secret_value()})

    served = cli("The parcel arrived")
    assert served.exit_code == 0, served.output
    assert json.loads(served.stdout)["refused"] is False
    refused = cli(f"mail {api.subject['email']}")
    assert refused.exit_code == 3 and json.loads(refused.stdout)["reason"] == "erased_identifier"
    missing = cli("")
    assert missing.exit_code == 2 and "prompt must be" in missing.output


def test_predict_classifies_unscreened_texts_only(serving_api: ServingApi) -> None:
    api = serving_api
    texts = ["My invoice shows a double charge for the annual plan", f"Contact {api.subject['email'].upper()} now",
             api.erased_text]
    response = api.post("/v1/predict", {"dataset": "cls", "texts": texts})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["refused"] is False and sum(results[0]["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert [(r["refused"], r["reason"]) for r in results[1:]] == [(True, "erased_identifier"),
                                                                  (True, "near_erased_text")]
    assert results[1]["probabilities"] is None and results[1]["label"] is None


def test_serving_needs_the_generate_scope_and_the_right_family(serving_api: ServingApi) -> None:
    api = serving_api
    body = {"dataset": "gen", "prompt": "The parcel arrived"}
    assert api.post("/v1/generate", body, who=None).status_code == 401
    assert api.post("/v1/generate", body, who="screen").status_code == 403
    assert api.post("/v1/predict", {"dataset": "cls", "texts": ["x"]}, who="screen").status_code == 403
    assert api.post("/v1/generate", {**body, "dataset": "cls"}).status_code == 409  # a classifier cannot generate
    assert api.post("/v1/predict", {"dataset": "gen", "texts": ["x"]}).status_code == 409
    assert api.post("/v1/generate", {**body, "dataset": "nope"}).status_code == 404
    assert api.post("/v1/generate", {**body, "max_words": 0}).status_code == 422
    schema = api.client.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/predict"):
        operation = schema["paths"][path]["post"]
        assert {"200", "401", "403", "404", "409", "422"} <= set(operation["responses"])

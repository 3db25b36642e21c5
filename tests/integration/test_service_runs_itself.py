"""Nothing waits for an operator: a request submitted over HTTP is processed by itself.

Real parts only: the session's Prefect server, the processing flow served as the
``process-erasure-request/on-demand`` deployment by ``flow.serve`` in a subprocess,
and the API as ``erasure serve`` in another. The test only talks HTTP (and reads
our database to find the match references a reviewer would be shown)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from db.requests import issue_token
from db.session import unit_of_work
from db.settings import Settings, use_settings
from pipeline.database import open_database
from pipeline.erasure import undecided_refs
from pipeline.lifecycle import get_request
from tests.conftest import TEST_SECRET
from tests.prefect_server import api_server, free_port, stop_process_group, trained_demo

ROOT = Path(__file__).resolve().parents[2]
BASE = "/v1/erasure-requests"
DEPLOYMENT = "process-erasure-request/on-demand"
# the on-demand deployment's parameters in infra/prefect.yaml
# limit=1: the tests run on SQLite, one writer (README: a single worker); two review decisions start
# two runs of one request, which on SQLite must not retrain side by side
SERVE = ("from flows.process_request import process_erasure_request as f; "
         "f.serve(name='on-demand', parameters={'retrain': 'now', 'review_timeout_s': 0, "
         "'on_review_timeout': 'leave'}, limit=1, print_starting_message=False)")
RUN_TIMEOUT_S = 240


def _env(settings: Settings, prefect_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**prefect_env, "ERASURE_HOME": str(settings.home), "ERASURE_DATABASE_URL": settings.resolved_database_url,
            "ERASURE_SECRET_KEY": TEST_SECRET, "PYTHONPATH": str(ROOT), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            **extra}


@contextmanager
def served_deployment(env: dict[str, str], log: Path) -> Iterator[None]:
    """The processing flow served as the on-demand deployment until the block ends."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    started_at = time.time()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", SERVE], env=env, cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            with get_client(sync_client=True) as client:
                while True:
                    assert process.poll() is None, log.read_text()[-3000:]
                    try:
                        deployment = client.read_deployment_by_name(DEPLOYMENT)
                        # a deployment of an earlier test may still be there: wait for this process's
                        if deployment.updated and deployment.updated.timestamp() >= started_at - 1:
                            break
                    except ObjectNotFound:
                        pass
                    assert time.monotonic() < deadline, "serve did not register the deployment"
                    time.sleep(0.5)
            yield
        finally:
            stop_process_group(process)


def _tokens(settings: Settings) -> dict[str, str]:
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return {scope: issue_token(session, f"{scope}-bot", [scope])[0] for scope in ("intake", "review")}
    finally:
        engine.dispose()


def _wait_for_state(base: str, token: str, request_id: str, states: set[str], timeout_s: float = RUN_TIMEOUT_S,
                    log: Path | None = None) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{base}{BASE}/{request_id}", headers={"Authorization": f"Bearer {token}"},
                          timeout=10).json()["state"]
        if state in states:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"request still {state} after {timeout_s} s\n"
                                 + (log.read_text(errors="replace")[-3000:] if log else ""))
        time.sleep(1)


def _someone_elses_text(demo: dict) -> str:
    """A record's text that is not the subject's: found only from the sample, so reviewed."""
    import json

    subject = demo["subject"]
    for line in Path(demo["files"].records).read_text().splitlines():
        record = json.loads(line)
        if record.get("email") != subject["email"] and record["id"] not in subject["copies"] and record.get("email"):
            return record["text"]
    raise AssertionError("no other record")


def _submit(base: str, token: str, email: str, key: str, samples: list[str] = []) -> httpx.Response:  # noqa: B006
    return httpx.post(f"{base}{BASE}", json={"identifiers": [{"kind": "email", "value": email}], "samples": samples},
                      headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key}, timeout=30)


def test_a_request_submitted_over_http_alone_reaches_completed(settings, prefect_env, tmp_path) -> None:  # noqa: ANN001
    demo = trained_demo(settings, records=300, shards=2, slices=2)
    tokens = _tokens(settings)
    env = _env(settings, prefect_env)
    serve_log = tmp_path / "serve.log"
    with served_deployment(env, serve_log), api_server(env, tmp_path / "api.log") as base:
        answer = _submit(base, tokens["intake"], demo["subject"]["email"], "http-only",
                         samples=[_someone_elses_text(demo)])
        assert answer.status_code == 202, answer.text
        request_id = answer.json()["id"]
        state = _wait_for_state(base, tokens["intake"], request_id, {"completed", "awaiting_review", "failed"},
                                log=serve_log)
        # a match reached only from the requester's sample waits for a person (the default policy)
        assert state == "awaiting_review"
        if state == "awaiting_review":  # a reviewer decides over HTTP; nothing else starts the rest
            engine = open_database(settings)
            with unit_of_work(engine) as session:
                refs = undecided_refs(session, request_id)
            engine.dispose()
            decided = httpx.post(f"{base}{BASE}/{request_id}/review-decisions",
                                 json={"decisions": [{"match_ref": ref, "decision": "erase"} for ref in refs]},
                                 headers={"Authorization": f"Bearer {tokens['review']}"}, timeout=30)
            assert decided.status_code == 200, decided.text
            state = _wait_for_state(base, tokens["intake"], request_id, {"completed", "failed"}, log=serve_log)
        assert state == "completed"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_request_submitted_while_prefect_is_down_is_started_by_the_sweep(settings, prefect_env,  # noqa: ANN001
                                                                            tmp_path) -> None:
    from flows.sweep import sweep_requests

    _ingested_demo(settings)
    tokens = _tokens(settings)
    dead = {**prefect_env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}  # nothing listens there
    api_log = tmp_path / "api.log"
    with api_server(_env(settings, dead), api_log) as base:
        answer = _submit(base, tokens["intake"], "nobody.here@example.org", "while-down")
        assert answer.status_code == 202, answer.text  # accepted all the same
        request_id = answer.json()["id"]
        deadline = time.monotonic() + 30
        while "could not start" not in api_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, api_log.read_text()[-3000:]
            time.sleep(0.5)
        assert httpx.get(f"{base}{BASE}/{request_id}", headers={"Authorization": f"Bearer {tokens['intake']}"},
                         timeout=10).json()["state"] == "received"
    logged = api_log.read_text(errors="replace")
    assert request_id in logged and "nobody.here" not in logged  # the id, never what the subject gave

    env = _env(settings, prefect_env)
    serve_log = tmp_path / "serve.log"
    with served_deployment(env, serve_log), use_settings(settings):
        summary = sweep_requests(received_grace_s=0)
        assert summary["started"] == [request_id] and summary["failed_to_start"] == []
        again = sweep_requests(received_grace_s=0)  # its run is live (or done): not started twice
        assert again["started"] == [] or _state(settings, request_id) == "completed"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while _state(settings, request_id) != "completed":
            assert time.monotonic() < deadline, serve_log.read_text(errors="replace")[-3000:]
            time.sleep(1)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_missing_deployment_leaves_the_request_received(settings, prefect_env, tmp_path) -> None:  # noqa: ANN001
    tokens = _tokens(settings)
    api_log = tmp_path / "api.log"
    with api_server(_env(settings, prefect_env, ERASURE_PROCESS_DEPLOYMENT="no-such-flow/nowhere"), api_log) as base:
        answer = _submit(base, tokens["intake"], "someone@example.org", "no-deployment")
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 30
        while "could not start" not in api_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, api_log.read_text()[-3000:]
            time.sleep(0.5)
        assert _state(settings, answer.json()["id"]) == "received"
        assert "ObjectNotFound" in api_log.read_text()


def _ingested_demo(settings: Settings, records: int = 200) -> None:
    """A small dataset, ingested (not trained): the subject's erasure has something to search."""
    from flows.training import ingest_dataset
    from shards.demo_data import write_demo
    from tests.prefect_server import IDENTIFIER_FIELDS

    files = write_demo(settings.home / "demo-data", records, seed=0)
    with use_settings(settings):
        ingest_dataset(str(files.records), "demo", identifier_fields=IDENTIFIER_FIELDS, shards=2, slices=2)


def _state(settings: Settings, request_id: str) -> str:
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return get_request(session, request_id).state
    finally:
        engine.dispose()

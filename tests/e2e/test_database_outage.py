"""PostgreSQL goes down under a running API (a private cluster, stopped and
started again mid-test): while it is down every call answers 503 with
Retry-After, never 500; once it is back the same server answers again by
itself, and a submission retried with its Idempotency-Key is stored once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from sqlalchemy import select

from db.requests import ErasureRequest, issue_token
from db.session import make_engine, unit_of_work, upgrade_to_head
from tests.e2e.test_api import BASE, cli_env
from tests.prefect_server import api_server
from tests.private_postgres import private_postgres

BODY = {"identifiers": [{"kind": "email", "value": "jane@example.org"}], "samples": ["my kettle review"]}


def test_the_api_answers_503_while_postgres_is_down_and_recovers_by_itself(tmp_path: Path) -> None:
    with private_postgres() as cluster:
        upgrade_to_head(cluster.url)
        engine = make_engine(cluster.url)
        with unit_of_work(engine) as session:
            intake, _ = issue_token(session, "intake-client", ["intake"])
            audit, _ = issue_token(session, "audit-client", ["audit"])
        engine.dispose()
        with api_server(cli_env(tmp_path / "home", cluster.url), tmp_path / "api.log") as base, \
                httpx.Client(base_url=base, timeout=30) as http:

            def submit(key: str) -> httpx.Response:
                return http.post(BASE, json=BODY, headers={"Authorization": f"Bearer {intake}",
                                                           "Idempotency-Key": key})

            before = submit("before-outage")
            assert before.status_code == 202, before.text

            cluster.stop()
            down = [submit("during-outage"),
                    http.get(f"{BASE}/{before.json()['id']}", headers={"Authorization": f"Bearer {audit}"}),
                    http.get("/v1/audit/requests/due", headers={"Authorization": f"Bearer {audit}"})]
            time.sleep(2.5)  # past the token cache: the token lookup itself meets the dead database
            down.append(submit("during-outage"))
            for response in down:
                assert response.status_code == 503, (response.status_code, response.text)
                assert response.json()["error"]["code"] == "database_unavailable"
                assert int(response.headers["Retry-After"]) > 0

            cluster.start()
            deadline = time.monotonic() + 30
            while (after := submit("during-outage")).status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert after.status_code == 202, after.text
            again = submit("during-outage")  # the client's retry of the same submission
            assert again.status_code == 202 and again.json()["id"] == after.json()["id"]
            shown = http.get(f"{BASE}/{after.json()['id']}", headers={"Authorization": f"Bearer {audit}"})
            assert shown.status_code == 200 and shown.json()["state"] == "received"

        engine = make_engine(cluster.url)
        with unit_of_work(engine) as session:
            keys = sorted(session.scalars(select(ErasureRequest.idempotency_key)))
        engine.dispose()
        assert keys == ["before-outage", "during-outage"]
        assert "Traceback" not in (tmp_path / "api.log").read_text()

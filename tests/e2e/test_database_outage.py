"""PostgreSQL goes down (a private cluster, stopped and started again mid-test).
Under a running API: while it is down every call answers 503 with Retry-After,
never 500; once it is back the same server answers again by itself, and a
submission retried with its Idempotency-Key is stored once. Under a running
flow (marked ``reliability``): the run ends as an undisturbed one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import select

from db.requests import ErasureRequest, issue_token
from db.session import make_engine, unit_of_work, upgrade_to_head
from db.settings import Settings
from tests.conftest import TEST_SECRET
from tests.e2e.test_api import BASE, cli_env
from tests.e2e.test_kill_resume import PROCESS, ROOT, _final_state, _restore, _run_to_end
from tests.prefect_server import api_server, submit_for, trained_demo
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


RESTART_AT_STATES = ("erasing", "awaiting_retrain", "retraining")


@pytest.mark.reliability
def test_a_postgres_restart_in_the_middle_of_processing_ends_as_an_undisturbed_run(
        tmp_path: Path, prefect_api_url: str) -> None:
    """The flow runs in a subprocess; once the request is past locate, PostgreSQL goes
    down for a few seconds (fast shutdown: every connection is cut). The tasks' transient
    retries carry the run to ``completed`` with the same shard versions, matches, erased
    records, tombstones and ensemble as an undisturbed run from the same start."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with private_postgres() as cluster:
        home = tmp_path / "home"
        settings = Settings(home=home, database_url=cluster.url, secret_key=TEST_SECRET)
        with temporary_settings({PREFECT_API_URL: prefect_api_url}):
            demo = trained_demo(settings, records=800)
        request_id = submit_for(settings, demo["subject"])
        shutil.copytree(home, tmp_path / "template")
        with psycopg.connect(cluster.admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'erasure'")
            admin.execute("CREATE DATABASE undisturbed TEMPLATE erasure")
        undisturbed = Settings(home=home, database_url=cluster.url.rsplit("/", 1)[0] + "/undisturbed",
                               secret_key=TEST_SECRET)
        reference = _run_to_end(undisturbed, tmp_path, request_id, prefect_api_url)

        _restore(tmp_path)
        env = {**os.environ, "ERASURE_HOME": str(home), "ERASURE_DATABASE_URL": cluster.url,
               "ERASURE_SECRET_KEY": TEST_SECRET, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": prefect_api_url,
               "PREFECT_LOGGING_LEVEL": "INFO"}  # task retries are logged at INFO
        code = ("from flows.process_request import process_erasure_request as p; "
                f"print(p({request_id!r}, 'demo', **{PROCESS!r})['state'])")
        run = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        logged: list[str] = []
        reader = threading.Thread(target=lambda: logged.extend(iter(run.stderr.readline, "")), daemon=True)
        reader.start()
        state, deadline = "received", time.monotonic() + 300
        while state not in RESTART_AT_STATES and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            with psycopg.connect(cluster.admin_url.rsplit("/", 1)[0] + "/erasure") as watch:
                state = watch.execute("SELECT state FROM erasure_requests WHERE id = %s", (request_id,)).fetchone()[0]
        assert state in RESTART_AT_STATES, f"the run ended before the restart ({state})"
        cluster.stop()
        # Down until a task has met the outage and is waiting to retry (Prefect logs "Retry 1/3 will
        # start ..."), at most 12 s: within the retries' 1 + 4 + 15 s.
        down_until = time.monotonic() + 12
        while not any(" - Retry " in line for line in logged) and time.monotonic() < down_until:
            time.sleep(0.2)
        cluster.start()
        out, _ = run.communicate(timeout=600)
        reader.join(timeout=10)
        err = "".join(logged)
        assert run.returncode == 0 and out.strip().endswith("completed"), err[-3000:]
        retries = err.count(" - Retry ")
        print(f"restarted in state {state}; task retries logged: {retries}")
        assert retries >= 1, "no task met the outage: the restart proved nothing"
        assert _final_state(settings, request_id) == reference

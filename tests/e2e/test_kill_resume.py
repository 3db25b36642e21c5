"""Kill -9 at each step boundary of ``process_erasure_request`` (in a subprocess),
run the flow again, and compare with an uninterrupted run: the same shard
versions, matches, erased records, tombstones and ensemble members.

On SQLite and on PostgreSQL. Per backend, one trained dataset with a submitted
request is kept as a template (a directory, and on PostgreSQL also a template
database) and the uninterrupted reference run is done once. Each case restores
the home directory from the template (the lineage stores absolute paths, so a
backend's cases all run in the same home) and, on PostgreSQL, gets a fresh
database (``postgres_url``) recreated as a copy of the template database.
The slow boundaries run on SQLite in the suite; on PostgreSQL they are marked
``reliability`` (``python -m pytest -m reliability tests/e2e/test_kill_resume.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select

from db.models import Record, ShardVersion
from db.session import unit_of_work
from db.settings import Settings
from db.training import EnsembleMemberRow, RequestMatch
from pipeline.database import open_database
from pipeline.erasure import KILL_ENV
from pipeline.training import current_ensemble_row
from db.settings import use_settings
from tests.conftest import ADMIN_URL, TEST_SECRET, _libpq
from tests.prefect_server import submit_for, trained_demo

ROOT = Path(__file__).resolve().parents[2]
SLOW_BOUNDARIES = ["after:locate", "retrain:trained"]
BOUNDARIES = [
    pytest.param("after:locate", marks=pytest.mark.slow),
    "erase:after_shard_file",  # new shard file written, not yet recorded
    "after:erase",
    "retrain:after_checkpoint",  # one retrained checkpoint written
    pytest.param("retrain:trained", marks=pytest.mark.slow),  # retrained, ensemble not yet published
    "verify:before",
]
PROCESS = dict(review_timeout_s=0, on_review_timeout="erase")


def _admin(sql: str) -> None:
    with psycopg.connect(_libpq(ADMIN_URL), autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql)


def _copy_database(template: str, name: str) -> None:
    """(Re)create database ``name`` as a copy of ``template`` (no session may use the template)."""
    with psycopg.connect(_libpq(ADMIN_URL), autocommit=True, connect_timeout=5) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (template,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')


def _pg_url(name: str) -> str:
    base = _libpq(ADMIN_URL).rsplit("/", 1)[0]
    return f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def case(request, tmp_path_factory, prefect_api_url):  # noqa: ANN001, ANN201
    """Per backend: a trained demo dataset with one submitted request, kept as a
    template, and the final state of an uninterrupted run from it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    backend = request.param
    base = tmp_path_factory.mktemp(f"kill-{backend}")
    home = base / "home"
    created: list[str] = []
    if backend == "sqlite":
        url = f"sqlite:///{home / 'erasure.db'}"
        template_db = None
    else:
        template_db = f"erasure_test_kill_{uuid.uuid4().hex[:12]}"
        _admin(f'CREATE DATABASE "{template_db}"')
        created.append(template_db)
        url = _pg_url(template_db)
    try:
        settings = Settings(home=home, database_url=url, secret_key=TEST_SECRET)
        with temporary_settings({PREFECT_API_URL: prefect_api_url}):
            demo = trained_demo(settings, records=800)
        request_id = submit_for(settings, demo["subject"])
        shutil.copytree(home, base / "template")
        if template_db is not None:
            # The reference run works on a copy: the template database stays as submitted.
            reference_db = f"{template_db}_ref"
            _copy_database(template_db, reference_db)
            created.append(reference_db)
            settings = Settings(home=home, database_url=_pg_url(reference_db), secret_key=TEST_SECRET)
        reference = _run_to_end(settings, base, request_id, prefect_api_url)
        yield {"backend": backend, "settings": settings, "base": base, "request_id": request_id,
               "reference": reference, "api_url": prefect_api_url, "template_db": template_db}
    finally:
        for name in reversed(created):
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _restore(base: Path) -> None:
    shutil.rmtree(base / "home")
    shutil.copytree(base / "template", base / "home")


def _run_to_end(settings: Settings, base: Path, request_id: str, api_url: str) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.process_request import process_erasure_request

    with temporary_settings({PREFECT_API_URL: api_url}), use_settings(settings):
        result = process_erasure_request(request_id, "demo", **PROCESS)
    assert result["state"] == "completed"
    return _final_state(settings, request_id)


def _final_state(settings: Settings, request_id: str) -> dict:
    from pipeline.locate import load_tombstones

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            versions = sorted((v.shard, v.version, v.row_count, v.sha256, v.created_by)
                              for v in session.scalars(select(ShardVersion)))
            matches = sorted((m.shard, m.record_id, m.decision, m.final_decision, m.erased_in_shard_version)
                             for m in session.scalars(select(RequestMatch)))
            erased = sorted((r.record_id, r.erased_in_shard_version) for r in session.scalars(
                select(Record).where(Record.erased_in_shard_version.is_not(None))))
            current = current_ensemble_row(session, session.scalars(select(Record.dataset_id)).first())
            members = sorted((m.shard, m.checkpoint_key) for m in session.scalars(
                select(EnsembleMemberRow).where(EnsembleMemberRow.ensemble_id == current.id)))
            from pipeline.lifecycle import get_request

            state = get_request(session, request_id).state
    finally:
        engine.dispose()
    tombstones = load_tombstones(settings, "demo")
    return {"versions": versions, "matches": matches, "erased": erased, "members": members, "state": state,
            "tombstones": sorted(tombstones.keys) if tombstones else []}


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_kill_at_boundary_then_resume(case, boundary: str, request: pytest.FixtureRequest) -> None:  # noqa: ANN001
    if case["backend"] == "postgres" and request.node.get_closest_marker("slow"):
        pytest.skip("on PostgreSQL the slow boundaries are marked reliability: "
                    "test_kill_at_a_slow_boundary_on_postgres_then_resume")
    _kill_and_resume(case, boundary, request)


@pytest.mark.reliability
@pytest.mark.postgres
@pytest.mark.parametrize("case", ["postgres"], indirect=True)
@pytest.mark.parametrize("boundary", SLOW_BOUNDARIES)
def test_kill_at_a_slow_boundary_on_postgres_then_resume(case, boundary: str,  # noqa: ANN001
                                                        request: pytest.FixtureRequest) -> None:
    _kill_and_resume(case, boundary, request)


def _kill_and_resume(case: dict, boundary: str, request: pytest.FixtureRequest) -> None:
    _restore(case["base"])
    settings: Settings = case["settings"]
    if case["template_db"] is not None:
        fresh = request.getfixturevalue("postgres_url")  # a fresh database, dropped after the test
        _copy_database(case["template_db"], fresh.rsplit("/", 1)[1])
        settings = Settings(home=settings.home, database_url=fresh, secret_key=TEST_SECRET)
    env = {**os.environ, "ERASURE_HOME": str(settings.home), "ERASURE_DATABASE_URL": settings.resolved_database_url,
           "ERASURE_SECRET_KEY": TEST_SECRET, KILL_ENV: boundary, "PYTHONPATH": str(ROOT),
           "PREFECT_API_URL": case["api_url"]}
    code = ("from flows.process_request import process_erasure_request as p; "
            f"p({case['request_id']!r}, 'demo', **{PROCESS!r})")
    killed = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    resumed = _run_to_end(settings, case["base"], case["request_id"], env["PREFECT_API_URL"])
    assert resumed == case["reference"]

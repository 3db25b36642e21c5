"""OpenLineage export of a real small pipeline: ingest, train, one erasure request
processed to completion with retraining (Prefect flows against the session's
server), on SQLite and PostgreSQL. Every line is validated offline against the
OpenLineage 2-0-2 JSON schema and the facet schemas in tests/resources/openlineage/
(see its README), and the custom facet against the schema shipped in
pipeline/openlineage_facets/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from sqlalchemy import select

from db.models import Dataset, ShardVersion
from db.session import unit_of_work
from db.settings import Settings
from db.training import ShardRetrainJob
from pipeline.database import open_database
from pipeline.lineage_export import FACETS_DIR, export_lineage
from tests.conftest import ADMIN_URL, TEST_SECRET, _libpq

RESOURCES = Path(__file__).parent.parent / "resources" / "openlineage"
# The shipped core schema is upstream's file, unmodified: spec 2-0-7. The client
# stamps 2-0-2 into schemaURL; 2-0-3..2-0-7 only add optional definitions, so an
# event valid under 2-0-7 is valid 2-0-2 (README). The 1-0-0 facet schemas reference
# core 1-0-2, which the same file serves too.
CORE = "https://openlineage.io/spec/2-0-7/OpenLineage.json"
EMITTED_CORE = "https://openlineage.io/spec/2-0-2/OpenLineage.json"  # what openlineage-python stamps
CORE_ALIASES = (EMITTED_CORE,
                "https://openlineage.io/spec/1-0-2/OpenLineage.json")
FACET_SCHEMAS = {  # facet key -> (schema file, $defs name)
    "schema": ("SchemaDatasetFacet.json", "SchemaDatasetFacet"),
    "version": ("DatasetVersionDatasetFacet.json", "DatasetVersionDatasetFacet"),
    "outputStatistics": ("OutputStatisticsOutputDatasetFacet.json", "OutputStatisticsOutputDatasetFacet"),
}
CUSTOM_FACET_FILE = FACETS_DIR / "ErasureRequestRunFacet.json"


# ---------------------------------------------------------------- offline schema validation


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def schema_registry() -> Registry:
    """Every schema we validate against, by its $id; nothing is fetched."""
    core = _load(RESOURCES / "OpenLineage.json")
    assert core["$id"] == CORE
    resources = [(CORE, Resource.from_contents(core))]
    resources += [(alias, Resource.from_contents({**core, "$id": alias})) for alias in CORE_ALIASES]
    for file_name, _ in FACET_SCHEMAS.values():
        facet = _load(RESOURCES / file_name)
        resources.append((facet["$id"], Resource.from_contents(facet)))
    custom = _load(CUSTOM_FACET_FILE)
    resources.append((custom["$id"], Resource.from_contents(custom)))

    def refuse(uri: str):  # noqa: ANN202 - a reference we do not ship is a test failure, not a download
        raise LookupError(f"schema {uri} is not in tests/resources/openlineage")

    return Registry(retrieve=refuse).with_resources(resources)


def validator(ref: str, registry: Registry) -> Draft202012Validator:
    return Draft202012Validator({"$ref": ref}, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


class Validators:
    def __init__(self) -> None:
        self.registry = schema_registry()
        self.run_event = validator(f"{CORE}#/$defs/RunEvent", self.registry)
        self.document = validator(CORE, self.registry)
        self.facets = {key: validator(f"{_load(RESOURCES / f)['$id']}#/$defs/{name}", self.registry)
                       for key, (f, name) in FACET_SCHEMAS.items()}
        self.erasure_request = validator(f"{_load(CUSTOM_FACET_FILE)['$id']}#/$defs/ErasureRequestRunFacet",
                                         self.registry)

    def check(self, event: dict) -> None:
        self.run_event.validate(event)
        self.document.validate(event)
        for ds in [*event.get("inputs", []), *event.get("outputs", [])]:
            for key, facet in {**ds.get("facets", {}), **ds.get("outputFacets", {})}.items():
                self.facets[key].validate(facet)
        for key, facet in event["run"].get("facets", {}).items():
            assert key == "erasure_request", key
            self.erasure_request.validate(facet)


@pytest.fixture(scope="module")
def validators() -> Validators:
    return Validators()


# ---------------------------------------------------------------- the pipeline (once per backend)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str):
    """400 demo records ingested and trained through the flows, one request processed
    to completion with retraining (borderline matches erased by the timeout policy)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.process_request import process_erasure_request
    from db.settings import use_settings
    from tests.prefect_server import submit_for, trained_demo

    tmp = tmp_path_factory.mktemp(f"lineage-{request.param}")
    db_name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'lineage.db'}"
    else:
        db_name = f"erasure_test_{uuid.uuid4().hex[:12]}"
        try:
            with psycopg.connect(_libpq(ADMIN_URL), autocommit=True, connect_timeout=5) as admin:
                admin.execute(f'CREATE DATABASE "{db_name}"')
        except psycopg.OperationalError as exc:
            pytest.fail(f"PostgreSQL is required for this test ({ADMIN_URL}): {exc}")
        base = _libpq(ADMIN_URL).rsplit("/", 1)[0]
        url = f"postgresql+psycopg://{base.split('://', 1)[1]}/{db_name}"
    settings = Settings(home=tmp / "home", database_url=url, secret_key=TEST_SECRET)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api_url}):
            demo = trained_demo(settings, records=400, shards=4, slices=3)
            request_id = submit_for(settings, demo["subject"])
            with use_settings(settings):
                outcome = process_erasure_request(request_id, "demo", review_timeout_s=0, on_review_timeout="erase")
        assert outcome["state"] == "completed", outcome
        yield {"settings": settings, "url": url, "demo": demo, "request_id": request_id, "outcome": outcome}
    finally:
        if db_name is not None:
            with psycopg.connect(_libpq(ADMIN_URL), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def export_to(settings: Settings, path: Path, **kwargs) -> dict:  # noqa: ANN003
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return export_lineage(session, path, **kwargs)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def exported(pipeline: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("export") / "lineage.jsonl"
    counts = export_to(pipeline["settings"], path)
    lines = path.read_text().splitlines()
    return {"path": path, "counts": counts, "events": [json.loads(line) for line in lines]}


# ---------------------------------------------------------------- tests


def test_every_line_is_a_valid_openlineage_run_event(exported: dict, validators: Validators) -> None:
    assert exported["events"] and exported["counts"]["events"] == len(exported["events"])
    for event in exported["events"]:
        validators.check(event)
        assert event["schemaURL"] == f"{EMITTED_CORE}#/$defs/RunEvent"
        assert event["job"]["namespace"] == "erasure-pipeline"


def test_runs_cover_the_four_jobs_with_start_and_complete(exported: dict) -> None:
    events = exported["events"]
    assert {e["job"]["name"] for e in events} == {"ingest", "train", "erase", "retrain"}
    by_run: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        by_run[event["run"]["runId"]].append(event)
    for run_id, run in by_run.items():
        assert [e["eventType"] for e in run] == ["START", "COMPLETE"], run_id  # in file order
        assert run[0]["eventTime"] <= run[1]["eventTime"]
        assert uuid.UUID(run_id).version == 5
    times = [e["eventTime"] for e in events]
    assert times == sorted(times)
    assert sum(exported["counts"]["runs"].values()) == len(by_run)


def test_erase_events_match_the_shard_versions_in_the_database(pipeline: dict, exported: dict) -> None:
    request_id = pipeline["request_id"]
    engine = open_database(pipeline["settings"])
    with unit_of_work(engine) as session:
        dataset_id = session.scalars(select(Dataset.id).where(Dataset.name == "demo")).one()
        expected = set()
        for version in session.scalars(select(ShardVersion).where(
                ShardVersion.dataset_id == dataset_id, ShardVersion.created_by == f"erasure:request:{request_id}")):
            before = session.scalars(select(ShardVersion.version).where(
                ShardVersion.dataset_id == dataset_id, ShardVersion.shard == version.shard,
                ShardVersion.version < version.version).order_by(ShardVersion.version.desc())).first()
            expected.add((f"shard-{version.shard}/v{before}", f"shard-{version.shard}/v{version.version}",
                          version.row_count))
        jobs = session.scalars(select(ShardRetrainJob).where(ShardRetrainJob.status == "done")).all()
        retrained = {(f"shard-{j.shard}/v{j.target_shard_version}", j.ensemble_version_id) for j in jobs}
    engine.dispose()
    assert expected
    completes = [e for e in exported["events"] if e["eventType"] == "COMPLETE"]
    erases = [e for e in completes if e["job"]["name"] == "erase"]
    got = {(e["inputs"][0]["name"], e["outputs"][0]["name"], e["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"])
           for e in erases}
    assert got == expected
    assert all(e["inputs"][0]["namespace"] == "erasure://demo" for e in erases)
    facets = [e["run"]["facets"]["erasure_request"] for e in erases]
    assert {f["requestId"] for f in facets} == {request_id}
    assert all(f["state"] == "completed" for f in facets)
    assert sum(f["recordsErased"] for f in facets) == facets[0]["requestRecordsErased"] == pipeline["outcome"]["erased"]
    # retraining: the shard version each job trained on -> the ensemble version it published
    retrain = {(e["inputs"][0]["name"], e["outputs"][0]["name"].removeprefix("ensemble/"))
               for e in completes if e["job"]["name"] == "retrain"}
    assert retrain == retrained and retrain


def test_custom_facet_schema_refuses_content(validators: Validators, exported: dict) -> None:
    facet = next(e["run"]["facets"]["erasure_request"] for e in exported["events"] if e["job"]["name"] == "erase")
    validators.erasure_request.validate(facet)
    for extra in ({"email": "jane@example.com"}, {"samples": ["text she wrote"]}):
        with pytest.raises(ValidationError):
            validators.erasure_request.validate({**facet, **extra})
    with pytest.raises(ValidationError):
        validators.erasure_request.validate({**facet, "matchesByMethod": {"minhash": {"found": 1, "record_ids": []}}})


def test_no_identifier_or_text_leaves_in_the_export(pipeline: dict, exported: dict) -> None:
    content = exported["path"].read_text()
    subject = pipeline["demo"]["subject"]
    for value in (subject["email"], subject["name"], subject["user_id"]):
        assert str(value) not in content
    for line in Path(pipeline["demo"]["files"].records).read_text().splitlines():
        record = json.loads(line)
        assert record["text"] not in content
        assert f'"{record["id"]}"' not in content  # no record ids either


def test_reexport_is_byte_identical_and_since_filters(pipeline: dict, exported: dict, tmp_path: Path) -> None:
    again = tmp_path / "again.jsonl"
    assert export_to(pipeline["settings"], again) == exported["counts"]
    assert again.read_bytes() == exported["path"].read_bytes()

    later = tmp_path / "later.jsonl"
    counts = export_to(pipeline["settings"], later, since=datetime.now(timezone.utc) + timedelta(days=1))
    assert counts["events"] == 0 and later.read_text() == ""
    first_erase = min(e["eventTime"] for e in exported["events"] if e["job"]["name"] == "erase")
    since = datetime.fromisoformat(first_erase.replace("Z", "+00:00"))
    recent = export_to(pipeline["settings"], tmp_path / "recent.jsonl", dataset="demo", since=since)
    assert recent["runs"]["ingest"] == 0 and recent["runs"]["erase"] == exported["counts"]["runs"]["erase"]


def test_cli_export_json_summary(pipeline: dict, exported: dict, tmp_path: Path) -> None:
    """`erasure lineage export --out FILE --json` in its own process: the summary on
    stdout, the same file as the library writes."""
    settings: Settings = pipeline["settings"]
    out = tmp_path / "cli.jsonl"
    env = {**os.environ, "ERASURE_SECRET_KEY": TEST_SECRET}
    env.pop("ERASURE_DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "lineage", "export", "--out", str(out), "--dataset", "demo", "--json",
         "--home", str(settings.home), "--database-url", pipeline["url"]],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["runs"] == exported["counts"]["runs"] and summary["events"] == exported["counts"]["events"]
    assert summary["out"] == str(out) and summary["dataset"] == "demo"
    assert out.read_bytes() == exported["path"].read_bytes()

"""The certificate claims only what was checked (issue 10, points 5 and 7), on both backends,
through the service layer (no Prefect: the steps the flow orders, called in order):

- a retraining in another runtime than the recorded one is refused (the job stays pending,
  the request waits); allowed, it is certified as not bitwise comparable, never as exact;
- a training or a retraining racing an erasure never publishes a member that saw an
  erased record: publishing re-checks the shard versions under the shard locks;
- one request erases a subject's records in every dataset, and the certificate has a
  section per dataset, each with its own membership probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.audit import AuditEvent, Certificate, MembershipProbe, verify_chain
from db.models import Record
from db.session import unit_of_work
from db.settings import Settings, use_settings
from db.lineage import latest_shard_versions
from db.training import JOB_DONE, JOB_PENDING, RequestMatch, ShardRetrainJob
from pipeline import processing
from pipeline.database import open_database
from pipeline.erasure import dataset_or_fail, erased_record_ids, request_jobs
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.lifecycle import get_request
from pipeline.membership import probe_membership, probe_rows
from pipeline.retraining import CrossRuntimeRetrainRefused, _claim, _train, retrain_shard_jobs, run_claimed_job
from pipeline.training import (
    checkpoint_store,
    current_ensemble,
    list_shards,
    publish_trained_members,
    train_one_shard,
)
from shards.demo_data import write_demo
from shards.ensemble import training_ids
from shards.sources import FieldMap
from tests.prefect_server import demo_subject, submit_for

RECORDS = 300
FIELDS = FieldMap(id_field="id", text_field="text", label_field="label",
                  identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")))
OPTIONS = {"epochs": 1.0, "hidden": [16], "batch_size": 64}


def _demo_files(settings: Settings):  # noqa: ANN202
    return write_demo(settings.home / "demo-data", RECORDS, seed=0)


def _ingest(settings: Settings, files, dataset: str, shards: int = 2) -> None:  # noqa: ANN001
    ingest_source_file(files.records, IngestOptions(dataset=dataset, fields=FIELDS, n_shards=shards, n_slices=3),
                       settings)


def _train_members(settings: Settings, dataset: str) -> list[dict]:
    return [train_one_shard(settings, dataset, shard, OPTIONS) for shard in list_shards(settings, dataset)]


def _erase(settings: Settings, request_id: str, datasets: list[str]) -> None:
    """The flow's steps up to the retraining: locate in each dataset, decide, erase in each."""
    with use_settings(settings):
        processing.start_processing(request_id)
        for name in datasets:
            processing.locate_and_record(request_id, name)
        assert processing.decide_after_locating(request_id)["state"] == "erasing"
        for name in datasets:
            processing.erase_records(request_id, name)
        processing.finish_erasing(request_id)


def _in_service(settings: Settings, dataset: str) -> set[str]:
    """Every record id the ensemble in service of ``dataset`` trained on (its training manifest)."""
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            version = current_ensemble(session, dataset_or_fail(session, dataset).id)
        return training_ids(version, checkpoint_store(settings, dataset))
    finally:
        engine.dispose()


def _erased(settings: Settings, request_id: str, dataset: str) -> list[str]:
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return erased_record_ids(session, request_id, dataset_or_fail(session, dataset).id)
    finally:
        engine.dispose()


# ---------------------------------------------------------------- 5a: the runtime of a retraining


def test_a_retraining_in_another_runtime_is_refused_then_certified_as_not_bitwise_comparable(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trained with one CPU thread, retrained by a worker configured for two: a recorded field
    differs (the CPU thread count), so the default refuses; allowed, the certificate says what
    was done and does not call it exact."""
    files = _demo_files(settings)
    _ingest(settings, files, "demo")
    monkeypatch.setenv("ERASURE_TORCH_THREADS", "1")
    publish_trained_members(settings, "demo", _train_members(settings, "demo"))
    request_id = submit_for(settings, demo_subject(files.ground_truth))
    _erase(settings, request_id, ["demo"])
    with use_settings(settings):
        shards = processing.shards_awaiting_retraining(request_id, "demo")
    erased = set(_erased(settings, request_id, "demo"))
    ensemble_before = _in_service(settings, "demo")
    assert shards and erased <= ensemble_before

    monkeypatch.setenv("ERASURE_TORCH_THREADS", "2")  # this worker's runtime
    with pytest.raises(CrossRuntimeRetrainRefused, match="differs in threads"):
        retrain_shard_jobs(settings, "demo", shards[0])
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            jobs = request_jobs(session, request_id)
            assert all(j.status == JOB_PENDING and j.target_shard_version is None for j in jobs)  # still pending
            assert get_request(session, request_id).state == "awaiting_retrain"  # the request waits
            refused = session.scalars(select(AuditEvent).where(AuditEvent.kind == "shard.retrain_refused")).all()
            assert [json.loads(e.details)["differences"] for e in refused] == [["threads"]]
        assert _in_service(settings, "demo") == ensemble_before  # nothing was published

        allowed = settings.model_copy(update={"allow_cross_runtime_retrain": True})
        for shard in shards:
            [result] = retrain_shard_jobs(allowed, "demo", shard)
            assert result["status"] == "done" and result["runtime_matches"] is False
        with unit_of_work(engine) as session:
            for job in request_jobs(session, request_id):
                assert job.status == JOB_DONE and job.runtime_matches is False and job.config_matches is True
                assert json.loads(job.runtime)["threads"] == 2 and json.loads(job.recorded_runtime)["threads"] == 1
        assert not erased & _in_service(settings, "demo")

        with use_settings(settings):
            assert processing.verify_and_complete(request_id)["state"] == "completed"
            assert processing.certify(request_id) is not None
        with unit_of_work(engine) as session:
            body = json.loads(session.get(Certificate, request_id).document)["certificate"]
            assert verify_chain(session).ok
    finally:
        engine.dispose()
    [section] = body["datasets"]
    assert len(section["retraining"]) == len(shards)
    for job in section["retraining"]:
        assert job["runtime_matches"] is False and job["exactness"]["status"] == "different_runtime"
        assert job["exactness"]["statement"] == ("retrained without the records on a different runtime: the model "
                                                 "never saw them; not bitwise comparable")
        assert job["runtime"]["threads"] == 2 and job["recorded_runtime"]["threads"] == 1
    assert body["erasure"]["exactness"] == {"exact": 0, "different_runtime": len(shards), "no_sub_model": 0,
                                            "not_established": 0}
    statement = body["scope"]["back_end_removal"]["statement"]
    assert f"{len(shards)} retrained without the records on a different runtime" in statement
    assert "exact" not in statement.replace("exactness", "")


# ---------------------------------------------------------------- 5b: publishing races an erasure


def test_a_training_racing_an_erasure_does_not_publish_a_member_that_saw_erased_records(settings: Settings) -> None:
    files = _demo_files(settings)
    _ingest(settings, files, "demo")
    publish_trained_members(settings, "demo", _train_members(settings, "demo"))
    members = _train_members(settings, "demo")  # a second training run (resumes: nothing new to train)...
    request_id = submit_for(settings, demo_subject(files.ground_truth))
    _erase(settings, request_id, ["demo"])  # ...and an erasure commits before it publishes
    erased = set(_erased(settings, request_id, "demo"))
    assert erased and erased <= {rid for m in members for rid in _seen(settings, m)}  # the members saw them

    published = publish_trained_members(settings, "demo", members)
    assert published["created"] and published["retrained_stale"]  # the stale member was trained again
    assert not erased & _in_service(settings, "demo")


def _seen(settings: Settings, member: dict) -> list[str]:
    return checkpoint_store(settings, "demo").load(member["checkpoint"])["seen_ids"] if member["checkpoint"] else []


def test_a_retraining_racing_a_second_erasure_of_its_shard_is_not_published_stale(settings: Settings) -> None:
    """Retraining claims the shard's job and trains on version v; a second request erases from
    the same shard (v+1) before the retraining publishes. The member trained on v saw the second
    request's records: it is not published; the job is retrained on v+1 instead."""
    files = _demo_files(settings)
    _ingest(settings, files, "demo")
    publish_trained_members(settings, "demo", _train_members(settings, "demo"))
    subject = demo_subject(files.ground_truth)
    first = submit_for(settings, subject, key="first")
    _erase(settings, first, ["demo"])
    with use_settings(settings):
        shard = processing.shards_awaiting_retraining(first, "demo")[0]
    other = _person_in_shard(settings, files, shard, exclude=subject["person"])

    engine = open_database(settings)
    try:
        claim = _claim(settings, engine, "demo", shard)
        trained = _train(settings, engine, "demo", shard, claim)
        second = submit_for(settings, other, key="second")
        _erase(settings, second, ["demo"])  # commits shard version v+1 while the retraining has not published
        late = set(_erased(settings, second, "demo"))
        assert late and late <= set(checkpoint_store(settings, "demo").load(trained["final"])["seen_ids"])

        result = run_claimed_job(settings, engine, "demo", shard, claim, trained)
        assert result["status"] == "done"
        assert not (late | set(_erased(settings, first, "demo"))) & _member_seen(settings, "demo", shard)
        with unit_of_work(engine) as session:
            superseded = session.scalars(select(AuditEvent).where(AuditEvent.kind == "shard.retrain_superseded")).all()
            assert len(superseded) == 1
            job = session.get(ShardRetrainJob, claim["job_id"])
            assert job.target_shard_version == json.loads(superseded[0].details)["latest_shard_version"]
        # the second request's own job then finds the shard up to date
        assert all(r["status"] == "done" for r in retrain_shard_jobs(settings, "demo", shard))
        with unit_of_work(engine) as session:
            assert all(j.status == JOB_DONE for j in request_jobs(session, second))
    finally:
        engine.dispose()


def _member_seen(settings: Settings, dataset: str, shard: int) -> set[str]:
    """The record ids the shard's sub-model in service trained on."""
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            version = current_ensemble(session, dataset_or_fail(session, dataset).id)
    finally:
        engine.dispose()
    [member] = [m for m in version.members if m.shard_id == str(shard)]
    return set(checkpoint_store(settings, dataset).load(member.checkpoint)["seen_ids"])


def _person_in_shard(settings: Settings, files, shard: int, exclude: int) -> dict:  # noqa: ANN001
    """Another demo person whose records lie in ``shard``."""
    rows = [json.loads(line) for line in Path(files.ground_truth).read_text().splitlines()]
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            shard_of = {rid: s for rid, s in session.execute(select(Record.record_id, Record.shard))}
    finally:
        engine.dispose()
    return next(r for r in rows if r["type"] == "person" and r["person"] != exclude and r["originals"]
                and all(shard_of[rid] == shard for rid in r["originals"]))


# ---------------------------------------------------------------- 7: every dataset


def test_one_request_erases_the_subject_in_every_dataset_with_a_certificate_section_each(
        settings: Settings, prefect_env: dict) -> None:
    """The same source in two datasets (other layouts; the same record ids, which the checks must
    keep apart): one request processed by the flow without naming a dataset, both datasets'
    records erased, two sections in the certificate."""
    from flows.process_request import process_erasure_request

    files = _demo_files(settings)
    # three shards at least: the reference-calibrated probe needs the probing sub-model and two references
    _ingest(settings, files, "alpha", shards=3)
    _ingest(settings, files, "beta", shards=4)
    for name in ("alpha", "beta"):
        publish_trained_members(settings, name, _train_members(settings, name))
    subject = demo_subject(files.ground_truth)
    request_id = submit_for(settings, subject)

    with use_settings(settings):
        assert processing.datasets_to_process(request_id) == ["alpha", "beta"]  # None: every dataset
        summary = process_erasure_request(request_id, review_timeout_s=0, on_review_timeout="erase")
    assert summary["state"] == "completed"
    assert [d["dataset"] for d in summary["datasets"]] == ["alpha", "beta"]
    assert all(d["erased"] > 0 for d in summary["datasets"])
    for name in ("alpha", "beta"):
        erased = set(_erased(settings, request_id, name))
        assert set(subject["originals"]) <= erased  # the subject's records, in each dataset
        assert not erased & _in_service(settings, name)

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            body = json.loads(session.get(Certificate, request_id).document)["certificate"]
    finally:
        engine.dispose()
    assert [s["dataset"]["name"] for s in body["datasets"]] == ["alpha", "beta"]
    assert [s["dataset"]["shards"] for s in body["datasets"]] == [3, 4]
    for section in body["datasets"]:
        assert section["locate"]["matches"] >= len(subject["originals"])
        assert section["erasure"]["records_erased"] == len(_erased(settings, request_id, section["dataset"]["name"]))
        assert section["verification"]["training_manifest"]["passed"] is True
        assert section["verification"]["training_manifest"]["erased_records"] == section["erasure"]["records_erased"]
        assert section["retraining"] and all(j["exactness"]["status"] == "exact" for j in section["retraining"])
        # each dataset's own probe: its sub-models, its ensemble versions, its erased records
        probes = section["verification"]["membership_probe"]
        assert isinstance(probes, list) and [p["role"] for p in probes] == ["before", "after"], probes
        assert [p["ensemble_version"] for p in probes] == [section["ensemble"]["before"],
                                                          section["ensemble"]["in_service"]]
        for probe in probes:
            assert probe["auc"] is not None, (section["dataset"]["name"], probe["role"], probe["reason"])
            assert probe["ci_low"] <= probe["auc"] <= probe["ci_high"]
            assert probe["erased_count"] == section["erasure"]["records_erased"] and probe["heldout_count"] > 0
            assert probe["sentence"]
        assert probes[0]["erased_seen_by_scorer"] == probes[0]["erased_count"]
        assert probes[1]["erased_seen_by_scorer"] == 0
        png = settings.home / "reports" / request_id / f"membership-{section['dataset']['name']}.png"
        assert png.read_bytes().startswith(b"\x89PNG")
    versions = [p["ensemble_version"] for s in body["datasets"] for p in s["verification"]["membership_probe"]]
    assert len(set(versions)) == 4  # four ensemble versions measured: no dataset reads another's probe
    assert body["erasure"]["records_erased"] == sum(s["erasure"]["records_erased"] for s in body["datasets"])
    assert body["erasure"]["datasets"] == 2

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            ids = {name: dataset_or_fail(session, name).id for name in ("alpha", "beta")}
            rows = session.scalars(select(MembershipProbe).where(MembershipProbe.request_id == request_id)).all()
            assert sorted((r.dataset_id, r.role) for r in rows) == sorted(
                (ids[n], role) for n in ids for role in ("before", "after"))
            probed = [json.loads(e.details) for e in session.scalars(select(AuditEvent).where(
                AuditEvent.request_id == request_id, AuditEvent.kind == "membership.probed"))]
            assert sorted(d["dataset"] for d in probed) == ["alpha", "beta"]
            # A row from before migration 0012 has no dataset: it reads as the first dataset's (by name).
            for row in rows:
                if row.dataset_id == ids["alpha"]:
                    row.dataset_id = None
        with unit_of_work(engine) as session:
            assert {(r.dataset_id, r.role) for r in probe_rows(session, request_id, ids["alpha"])} == {
                (None, "before"), (None, "after")}
            assert {(r.dataset_id, r.role) for r in probe_rows(session, request_id, ids["beta"])} == {
                (ids["beta"], "before"), (ids["beta"], "after")}
        with use_settings(settings):  # both datasets count as probed: a rerun measures nothing again
            assert [p["auc"] for p in probe_membership(settings, engine, request_id, "alpha")] == [
                p["auc"] for p in body["datasets"][0]["verification"]["membership_probe"]]
        with unit_of_work(engine) as session:
            assert len(session.scalars(select(MembershipProbe).where(
                MembershipProbe.request_id == request_id)).all()) == 4
    finally:
        engine.dispose()


def test_a_request_naming_datasets_at_intake_is_processed_against_those_only(settings: Settings) -> None:
    from pipeline.lifecycle import InvalidRequest, submit_request

    files = _demo_files(settings)
    _ingest(settings, files, "alpha")
    _ingest(settings, files, "beta")
    subject = demo_subject(files.ground_truth)
    engine = open_database(settings)
    try:
        def submit(key: str, datasets: list[str] | None) -> str:
            return submit_request(engine, settings.secret_key_bytes(), idempotency_key=key,
                                  identifiers=[("email", subject["email"])], samples=[], actor="test",
                                  datasets=datasets).request_id

        with pytest.raises(InvalidRequest, match="no dataset named 'gamma'"):
            submit("unknown", ["beta", "gamma"])
        with pytest.raises(InvalidRequest, match="at least one dataset"):
            submit("empty", [])
        request_id = submit("named", ["beta", "beta"])
        with unit_of_work(engine) as session:
            assert json.loads(get_request(session, request_id).datasets) == ["beta"]
        with use_settings(settings):
            assert processing.datasets_to_process(request_id) == ["beta"]
            with pytest.raises(ValueError, match="covers the datasets beta, not 'alpha'"):
                processing.datasets_to_process(request_id, "alpha")
        _erase(settings, request_id, ["beta"])
        with unit_of_work(engine) as session:
            erased = {(m.dataset_id, m.record_id) for m in session.scalars(
                select(RequestMatch).where(RequestMatch.request_id == request_id))}
            beta = dataset_or_fail(session, "beta").id
            assert erased and {d for d, _ in erased} == {beta}
            assert get_request(session, request_id).state == "verifying"  # no model had seen them
            assert all(v.version == 1 for v in latest_shard_versions(
                session, dataset_or_fail(session, "alpha").id).values())  # alpha untouched
    finally:
        engine.dispose()

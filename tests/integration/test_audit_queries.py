"""The audit queries against real lineage on both backends: a demo dataset
trained through the flows, two erasure requests processed end to end (each
retraining publishes new ensemble versions), then every answer is checked
against the artefacts themselves: the shard files, each checkpoint's
``seen_ids`` and each ensemble manifest's training ids."""

from __future__ import annotations

import json
from datetime import timedelta

import pyarrow.parquet as pq
from sqlalchemy import select
from typer.testing import CliRunner

from db.audit_queries import due_requests, ensemble_reflections, request_timeline, subject_lineage
from db.models import ShardVersion
from db.requests import RequestEvent
from db.session import unit_of_work
from db.training import Checkpoint, EnsembleVersionRow
from pipeline.database import open_database
from pipeline.erasure import erased_record_ids, request_matches
from pipeline.lifecycle import OPEN_STATES, hash_identifiers, submit_request, transition
from pipeline.training import checkpoint_store, current_ensemble_row
from db.settings import use_settings
from shards.demo_data import read_ground_truth
from shards.ensemble import EnsembleVersion, training_ids
from tests.conftest import TEST_SECRET
from tests.prefect_server import submit_for, trained_demo

RECORDS = 400

NOTE_KEY = b"test-note-key-0123456789abcdef"  # keys the notes' hashes on the audit log


def _process(settings, request_id: str) -> dict:  # noqa: ANN001
    from flows.process_request import process_erasure_request

    with use_settings(settings):
        return process_erasure_request(request_id, "demo", review_timeout_s=0, on_review_timeout="erase")


def _current_version(engine, dataset_id: int) -> str:  # noqa: ANN001
    with unit_of_work(engine) as session:
        return current_ensemble_row(session, dataset_id).version_id


def _check_against_artefacts(settings, session, lineage) -> None:  # noqa: ANN001
    """Each record's shard versions, checkpoints and ensemble versions are exactly
    those whose files / seen ids / manifests contain it (artefacts whose files
    were purged after an erasure are judged by the lineage alone)."""
    from pathlib import Path

    store = checkpoint_store(settings, "demo")
    checkpoints = [c for c in session.scalars(select(Checkpoint)).all() if Path(c.path).exists()]
    seen = {c.key: set(store.load(c.key)["seen_ids"]) for c in checkpoints}
    kept = {c.key for c in checkpoints}
    manifests = {e.version_id: EnsembleVersion.read(e.manifest_path) for e in session.scalars(select(EnsembleVersionRow))}
    trained_on = {v: training_ids(manifest, store) for v, manifest in manifests.items()
                  if all(m.checkpoint.key in kept for m in manifest.members)}
    for record in lineage.records:
        files = [v for v in session.scalars(select(ShardVersion).where(ShardVersion.shard == record.shard))
                 if Path(v.path).exists()]
        in_files = {v.version for v in files
                    if record.record_id in set(pq.read_table(v.path, columns=["record_id"])["record_id"].to_pylist())}
        assert set(record.shard_versions) & {v.version for v in files} == in_files, record
        assert {c.key for c in record.checkpoints} & set(seen) == {
            k for k, ids in seen.items() if record.record_id in ids}, record
        assert {e.version_id for e in record.ensemble_versions} & set(trained_on) == {
            v for v, ids in trained_on.items() if record.record_id in ids}, record
    assert checkpoints and trained_on  # something was left to check against


def test_subject_lineage_and_ensembles_after_two_erasures(settings, prefect_env) -> None:  # noqa: ANN001
    demo = trained_demo(settings, records=RECORDS, shards=4, slices=3)
    truth = read_ground_truth(demo["files"].ground_truth)
    a = demo["subject"]  # the person whose posts were copied (under other ids, without identifiers)
    b = max((p for p in truth["persons"] if p["person"] != a["person"]),
            key=lambda p: (len(p["originals"]), -p["person"]))
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        dataset_id = session.scalars(select(EnsembleVersionRow.dataset_id)).first()
    first = _current_version(engine, dataset_id)

    rid_a = submit_for(settings, a, "a")
    assert _process(settings, rid_a)["state"] == "completed"
    middle = _current_version(engine, dataset_id)
    rid_b = submit_for(settings, b, "b")
    assert _process(settings, rid_b)["state"] == "completed"
    last = _current_version(engine, dataset_id)
    assert len({first, middle, last}) == 3
    key = settings.secret_key_bytes()

    with unit_of_work(engine) as session:
        erased_a, erased_b = set(erased_record_ids(session, rid_a)), set(erased_record_ids(session, rid_b))
        matched_a = {m.record_id for m in request_matches(session, rid_a)}

        # c. subject A: the originals by identifier, the copies through the request's matches
        lineage = subject_lineage(session, hash_identifiers(key, [("email", a["email"])]), dataset="demo")
        by_id = {r.record_id: r for r in lineage.records}
        assert lineage.requests == (rid_a,)
        assert set(a["originals"]) <= {r.record_id for r in lineage.records if "identifier" in r.found_by}
        assert set(by_id) == set(a["originals"]) | matched_a
        copies = set(a["copies"]) & set(by_id)
        assert copies and all(by_id[c].found_by == ("request_match",) for c in copies)
        assert len({r.shard for r in lineage.records}) > 1, "the subject's records should span shards"
        assert set(by_id) == erased_a and lineage.erased == len(by_id)
        for record in lineage.records:
            assert record.erased_in_shard_version is not None
            assert record.shard_versions and max(record.shard_versions) < record.erased_in_shard_version
            assert not record.in_current_shard_version and not record.in_current_ensemble
            assert record.current_ensemble_version == last
            versions = {e.version_id for e in record.ensemble_versions}
            assert first in versions and middle not in versions and last not in versions
            assert all(c.slice >= record.slice for c in record.checkpoints)
        assert lineage.in_current_shard_versions == lineage.in_current_ensembles == 0
        _check_against_artefacts(settings, session, lineage)

        # subject B: erased by the second request, so the middle ensemble still held it
        lineage_b = subject_lineage(session, hash_identifiers(key, [("email", b["email"])]))
        assert lineage_b.requests == (rid_b,) and {r.record_id for r in lineage_b.records} == erased_b
        for record in lineage_b.records:
            versions = {e.version_id for e in record.ensemble_versions}
            assert {first, middle} <= versions and last not in versions
        _check_against_artefacts(settings, session, lineage_b)

        # a subject nobody asked about, nothing erased: in the current versions
        c = next(p for p in truth["persons"] if p["person"] not in (a["person"], b["person"]) and p["originals"])
        lineage_c = subject_lineage(session, hash_identifiers(key, [("user_id", c["user_id"])]))
        assert {r.record_id for r in lineage_c.records} == set(c["originals"]) and lineage_c.requests == ()
        assert all(r.in_current_shard_version and r.in_current_ensemble for r in lineage_c.records)
        assert lineage_c.ensemble_versions[0] == first and last in lineage_c.ensemble_versions

        # d. what each ensemble version reflects
        before = ensemble_reflections(session, first, dataset="demo")
        assert before.reflected == () and not before.is_current
        assert {h.request_id: h.erased_records_held for h in before.still_holding} == {
            rid_a: len(erased_a), rid_b: len(erased_b)}
        between = ensemble_reflections(session, middle)
        assert [r.request_id for r in between.reflected] == [rid_a]
        assert between.reflected[0].still_held == 0 and between.reflected[0].erased_records == len(erased_a)
        assert [h.request_id for h in between.still_holding] == [rid_b]
        assert first in between.lineage and between.lineage[0] == middle
        now = ensemble_reflections(session, last)
        assert now.is_current and now.still_holding == ()
        assert sorted(r.request_id for r in now.reflected) == sorted([rid_a, rid_b])
        assert all(r.still_held == 0 and set(r.produced) <= set(now.lineage) for r in now.reflected)

        # a. the timeline: every state change once, in order, merged with the audit log
        timeline = request_timeline(session, rid_a)
        history = session.scalars(select(RequestEvent).where(RequestEvent.request_id == rid_a)
                                  .order_by(RequestEvent.id)).all()
        from_history = [e for e in timeline.entries if e.request_event_id is not None]
        assert [e.request_event_id for e in from_history] == [h.id for h in history]
        assert [e.to_state for e in from_history] == [h.to_state for h in history]
        assert from_history[-1].to_state == "completed" and timeline.state == "completed"
        assert sum(e.audit_event_id is not None for e in timeline.entries) == timeline.audit_log_events
        assert [e.at for e in timeline.entries] == sorted(e.at for e in timeline.entries)
        assert not timeline.overdue
    engine.dispose()

    # the CLI gives the same answers (one JSON document) over the same database
    from api.cli import app

    runner = CliRunner(env={"ERASURE_SECRET_KEY": TEST_SECRET})  # the key the identifiers were hashed with
    common = ["--home", str(settings.home), "--database-url", settings.resolved_database_url, "--json"]
    result = runner.invoke(app, ["audit", "subject", "-i", f"email:{a['email']}", "--dataset", "demo", *common])
    assert result.exit_code == 0, result.output
    assert {r["record_id"] for r in json.loads(result.stdout)["records"]} == erased_a
    result = runner.invoke(app, ["audit", "ensemble", middle, *common])
    assert result.exit_code == 0 and [r["request_id"] for r in json.loads(result.stdout)["reflected"]] == [rid_a]
    result = runner.invoke(app, ["audit", "timeline", rid_b, *common])
    assert result.exit_code == 0 and json.loads(result.stdout)["state"] == "completed"
    result = runner.invoke(app, ["audit", "subject", "-i", "email:not-an-address", *common])
    assert result.exit_code == 2 and "email" in result.output


def test_overdue_and_soon_due_requests(settings) -> None:  # noqa: ANN001
    from db.models import utcnow

    engine = open_database(settings)
    now = utcnow()
    key = settings.secret_key_bytes()

    def submit(name: str, days_ago: float) -> str:
        return submit_request(engine, key, idempotency_key=name, identifiers=[("email", f"{name}@example.org")],
                              samples=[], actor="test", now=now - timedelta(days=days_ago)).request_id

    late, late_closed, soon, later, fresh = (submit("late", 40), submit("late-closed", 45), submit("soon", 27),
                                             submit("later", 15), submit("fresh", 0))
    with unit_of_work(engine) as session:
        transition(session, late, "locating", actor="test")
        transition(session, late_closed, "locating", actor="test")
        transition(session, late_closed, "completed", key=NOTE_KEY, actor="test", reason="nothing found")
    with unit_of_work(engine) as session:
        report = due_requests(session, open_states=OPEN_STATES, within_days=7, now=now)
        assert [r.request_id for r in report.overdue] == [late] and report.overdue[0].days_left < -8
        assert report.overdue[0].state == "locating"
        assert [r.request_id for r in report.due_soon] == [soon] and 0 < report.due_soon[0].days_left < 7
        wide = due_requests(session, open_states=OPEN_STATES, within_days=20, now=now)
        assert [r.request_id for r in wide.due_soon] == [soon, later]
        assert fresh not in {r.request_id for r in wide.overdue + wide.due_soon}
        timeline = request_timeline(session, late, now=now)
        assert timeline.overdue and [e.to_state for e in timeline.entries if e.request_event_id] == [
            "received", "locating"]
    engine.dispose()

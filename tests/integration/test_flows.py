"""The Prefect flows against a real Prefect server and both database backends:
review by pause and resume, review through the API, two requests on the same
shards at once with scheduled (batched) retraining."""

from __future__ import annotations

import contextvars
import json
import threading
import time

import pytest
from sqlalchemy import select

from pathlib import Path

from db.audit import AuditEvent, MembershipProbe
from db.lineage import latest_shard_versions
from db.models import Record, ShardVersion
from db.session import unit_of_work
from db.training import ShardRetrainJob
from pipeline.database import open_database
from pipeline.erasure import erased_record_ids, request_matches, undecided_refs
from pipeline.lifecycle import ReviewInput, get_request, issue_review_ticket, record_review_decisions
from pipeline.training import checkpoint_store, current_ensemble
from db.settings import use_settings
from tests.prefect_server import submit_for, trained_demo

NOTE_KEY = b"test-note-key-0123456789abcdef"  # keys the notes' hashes on the audit log


def _check_erased(settings, request_id: str) -> dict:  # noqa: ANN001
    """Everything the request erased is gone from the current shard versions, the
    lineage says where, and the ensemble in service never saw it."""
    import pyarrow.parquet as pq

    from shards.ensemble import training_ids

    engine = open_database(settings)
    with unit_of_work(engine) as session:
        request = get_request(session, request_id)
        erased = set(erased_record_ids(session, request_id))
        dataset_id = session.scalars(select(Record.dataset_id)).first()
        current = set()
        for version in latest_shard_versions(session, dataset_id).values():
            current |= set(pq.read_table(version.path, columns=["record_id"])["record_id"].to_pylist())
        records = {r.record_id: r for r in session.scalars(select(Record).where(Record.record_id.in_(erased)))}
        ensemble = current_ensemble(session, dataset_id)
        by_erasure = session.scalars(select(ShardVersion).where(
            ShardVersion.created_by == f"erasure:request:{request_id}")).all()
        state, samples = request.state, len(request.samples)
    engine.dispose()
    assert erased and not erased & current
    assert all(records[rid].erased_in_shard_version is not None for rid in erased)
    assert not erased & training_ids(ensemble, checkpoint_store(settings, "demo"))
    assert by_erasure
    return {"state": state, "erased": erased, "samples": samples}


def _thread(fn) -> threading.Thread:  # noqa: ANN001
    """A thread that sees this one's Prefect settings (they live in context variables)."""
    return threading.Thread(target=contextvars.copy_context().run, args=(fn,))


def _paused_run_id(request_id: str, timeout: float = 90, after_key: str | None = None):  # noqa: ANN202
    """The paused run of the request (once its input schema is saved); with ``after_key``, only
    once it paused again under another key than that one."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.input.run_input import keyset_from_paused_state

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            for run in runs:
                if run.parameters.get("request_id") == request_id:
                    if after_key is not None and run.state.state_details.pause_key == after_key:
                        break  # not paused again yet
                    # The input schema is saved just after the pause: resume only once it is there.
                    try:
                        client.read_flow_run_input(run.id, keyset_from_paused_state(run.state)["schema"])
                    except Exception:  # noqa: BLE001 - not saved yet
                        break
                    return run.id
            time.sleep(0.5)
    raise AssertionError("the flow did not pause for review")


def test_lifecycle_with_review_pause_and_resume(settings, prefect_env) -> None:  # noqa: ANN001
    from prefect.flow_runs import resume_flow_run

    from flows.process_request import process_erasure_request

    demo = trained_demo(settings)
    request_id = submit_for(settings, demo["subject"])
    outcome: dict = {}
    with use_settings(settings):
        worker = _thread(lambda: outcome.update(process_erasure_request(
            request_id, "demo", review_timeout_s=120, review_poll_s=1, on_review_timeout="fail")))
        worker.start()
        run_id = _paused_run_id(request_id)
        engine = open_database(settings)
        with unit_of_work(engine) as session:
            assert get_request(session, request_id).state == "awaiting_review"
            refs = undecided_refs(session, request_id)
        engine.dispose()
        assert refs
        # Input that does not match the schema is refused; the run stays paused.
        with pytest.raises(Exception):
            resume_flow_run(run_id, run_input={"decisions": [{"match_ref": refs[0], "decision": "maybe"}]})
        decisions = [{"match_ref": ref, "decision": "erase"} for ref in refs]
        pairs = [(ref, "erase") for ref in refs]
        # Decisions without a ticket the API issued (any reviewer name typed into Prefect, a ticket
        # signed with another key, or one for other decisions) are not applied: the run pauses again.
        forged, _ = issue_review_ticket(b"not-the-service-key-0123456789", request_id, "token:mallory", pairs)
        other, _ = issue_review_ticket(settings.secret_key_bytes(), request_id, "token:reviewer", pairs[:1] + [
            (refs[0] + "x", "keep")])
        with pytest.raises(RuntimeError, match="'reviewer' was unexpected"):  # no field for a typed name
            resume_flow_run(run_id, run_input={"decisions": decisions, "reviewer": "Jane Reviewer"})
        for attempt, bad in enumerate([{}, {"ticket": forged}, {"ticket": other}], 1):
            resume_flow_run(run_id, run_input={"decisions": decisions, **bad})
            run_id = _paused_run_id(request_id, after_key=f"review-{attempt}")
            engine = open_database(settings)
            with unit_of_work(engine) as session:
                assert get_request(session, request_id).state == "awaiting_review"
                assert get_request(session, request_id).review_decisions == []
                refused = session.scalars(select(AuditEvent).where(AuditEvent.kind == "review.resume_refused")).all()
            engine.dispose()
            assert [json.loads(e.details)["problem"] for e in refused] == [
                "missing_ticket", "bad_signature", "decisions_differ"][:attempt]
        # With the ticket the API issues to an authenticated reviewer, the decisions apply.
        ticket, _ = issue_review_ticket(settings.secret_key_bytes(), request_id, "token:reviewer", pairs)
        resume_flow_run(run_id, run_input={"decisions": decisions, "ticket": ticket})
        worker.join(timeout=180)
        assert not worker.is_alive()
        assert outcome["state"] == "completed"
        checked = _check_erased(settings, request_id)
        assert checked["samples"] == 0
        assert outcome["erased"] == len(checked["erased"])
        assert outcome["retraining"] and all(job["status"] == "done" for job in outcome["retraining"])
        engine = open_database(settings)
        with unit_of_work(engine) as session:
            assert {d.reviewer for d in get_request(session, request_id).review_decisions} == {"token:reviewer"}
        engine.dispose()
        # Running a completed request again changes nothing.
        again = process_erasure_request(request_id, "demo")
        assert again["erased"] == outcome["erased"] and again["state"] == "completed"
    assert (settings.home / "tombstones" / "demo.npz").exists()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_review_through_the_api_then_scheduled_retraining(settings, prefect_env) -> None:  # noqa: ANN001
    from flows.process_request import process_erasure_request
    from flows.retraining import retrain_pending

    demo = trained_demo(settings)
    request_id = submit_for(settings, demo["subject"])
    with use_settings(settings):
        first = process_erasure_request(request_id, "demo", review_timeout_s=0, on_review_timeout="leave")
        assert first["state"] == "awaiting_review" and first["erased"] == 0
        engine = open_database(settings)
        with unit_of_work(engine) as session:
            refs = undecided_refs(session, request_id)
            record_review_decisions(session, request_id, [ReviewInput(ref, "keep") for ref in refs], key=NOTE_KEY, reviewer="api")
        second = process_erasure_request(request_id, "demo", retrain="scheduled", review_timeout_s=0)
        assert second["state"] == "awaiting_retrain"
        assert second["kept"] == len(refs)
        done = retrain_pending()
        assert {"request_id": request_id, "state": "completed"} in done["completed"]
        engine.dispose()
    _check_erased(settings, request_id)


def test_two_requests_on_the_same_shards_at_once(settings, prefect_env) -> None:  # noqa: ANN001
    """Erasures of two subjects race on the same shards: both deletions land (the
    shard lock serialises them), and the scheduled run retrains each shard once. Record
    placement, so that two people share shards (subject placement keeps each in one)."""
    import json

    from flows.process_request import process_erasure_request
    from flows.retraining import retrain_pending

    demo = trained_demo(settings, placement="record")
    persons = [json.loads(line) for line in demo["files"].ground_truth.read_text().splitlines()]
    persons = sorted((p for p in persons if p["type"] == "person"), key=lambda p: (-len(p["originals"]), p["person"]))
    ids = [submit_for(settings, persons[0], "a"), submit_for(settings, persons[1], "b")]
    results: dict[str, dict] = {}
    with use_settings(settings):
        threads = [_thread(lambda rid=rid: results.update({rid: process_erasure_request(
            rid, "demo", retrain="scheduled", review_timeout_s=0, on_review_timeout="erase")})) for rid in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert all(results[rid]["state"] == "awaiting_retrain" for rid in ids)
        done = retrain_pending()
    assert sorted(r["request_id"] for r in done["completed"]) == sorted(ids)
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        jobs = session.scalars(select(ShardRetrainJob)).all()
        shared = {m.shard for m in request_matches(session, ids[0])} & {m.shard for m in request_matches(session, ids[1])}
    engine.dispose()
    assert shared, "the two subjects should share a shard"
    assert len({j.shard for j in jobs}) == len(jobs) and all(j.status == "done" for j in jobs)  # once per shard
    for rid in ids:
        _check_erased(settings, rid)
    # Whichever completed first left the shared shards' old files for the other's probe;
    # the second completion deleted them: no superseded file that held an erased record is left.
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        erased = [r for r in session.scalars(select(Record).where(Record.erased_in_shard_version.is_not(None)))]
        held = [v for v in session.scalars(select(ShardVersion)) if any(
            r.shard == v.shard and r.first_shard_version <= v.version < r.erased_in_shard_version for r in erased)]
        probes = session.scalars(select(MembershipProbe)).all()
    engine.dispose()
    assert held and all(v.files_purged_at is not None and not Path(v.path).exists() for v in held)
    assert len(probes) == 4 and all(p.auc is not None for p in probes), [(p.role, p.details) for p in probes]

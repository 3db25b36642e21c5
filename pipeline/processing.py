"""One erasure request's steps, from receipt to certificate, each idempotent.

Every step reads the request's state and recorded matches first and does only what is
left, so running the process again after a crash at any point finishes with the same
result. ``flows/process_request.py`` orders these steps under Prefect.
"""

from __future__ import annotations

from sqlalchemy import select

from db.audit import Certificate
from db.lineage import get_dataset
from db.models import Dataset
from db.requests import ErasureRequest
from db.session import unit_of_work
from db.settings import load_settings
from db.training import RequestMatch, ShardRetrainJob
from pipeline.certificate import certify_request
from pipeline.database import open_database
from pipeline.erasure import (
    ERASE,
    KEEP,
    Verification,
    apply_review_verdicts,
    crash_point,
    dataset_or_fail,
    erase_from_shard,
    locate_for_request,
    open_requests_waiting,
    per_method_counts,
    purge_superseded_files,
    record_matches,
    request_jobs,
    request_matches,
    resolve_undecided,
    retraining_done,
    shards_to_erase,
    verify_request,
)
from pipeline.lifecycle import RequestState, ReviewInput, get_request, record_review_decisions, transition
from pipeline.membership import probe_membership

ACTOR = "flow:process-erasure-request"
S = RequestState


def _engine():  # noqa: ANN202
    return open_database(load_settings())

def request_state(request_id: str) -> str:
    engine = _engine()
    try:
        with unit_of_work(engine) as session:
            return get_request(session, request_id).state
    finally:
        engine.dispose()

def _after_decisions(session, request_id: str, waiting: int, reason: str) -> None:  # noqa: ANN001
    """Leave locating/awaiting_review once every match is decided (or wait for review)."""
    state = get_request(session, request_id).state
    if waiting:
        if state == S.LOCATING:
            transition(session, request_id, S.AWAITING_REVIEW, actor=ACTOR, reason=f"{reason}; {waiting} undecided")
        return
    to_erase = any(m.final_decision == ERASE for m in request_matches(session, request_id))
    transition(session, request_id, S.ERASING if to_erase else S.COMPLETED, actor=ACTOR,
               reason=reason if to_erase else f"{reason}; nothing to erase")

def _enter_verifying(engine, request_id: str) -> str:  # noqa: ANN001
    """awaiting_retrain/retraining -> verifying once every retraining is done; the state after."""
    with unit_of_work(engine) as session:
        state = get_request(session, request_id, for_update=True).state
        if state in (S.AWAITING_RETRAIN, S.RETRAINING) and retraining_done(session, request_id):
            if state == S.AWAITING_RETRAIN:
                transition(session, request_id, S.RETRAINING, actor=ACTOR, reason="retrained by another run")
            transition(session, request_id, S.VERIFYING, actor=ACTOR)
            state = S.VERIFYING
        return state

def _verify_manifest(settings, engine, request_id: str, dataset: str) -> Verification:  # noqa: ANN001
    """The training manifest check; a failed one fails the request."""
    with unit_of_work(engine) as session:
        get_request(session, request_id, for_update=True)
        result = verify_request(settings, session, request_id, dataset)
        if not result.passed and get_request(session, request_id).state == S.VERIFYING:
            transition(session, request_id, S.FAILED, actor=ACTOR,
                       reason=f"{result.still_in_manifest} erased record(s) still in the training manifest")
        return result

def _complete(settings, engine, request_id: str, result: Verification) -> None:  # noqa: ANN001
    """Delete the superseded files that held the erased records, then complete: one
    transaction (a crash before the commit leaves it verifying; the purge is idempotent)."""
    with unit_of_work(engine) as session:
        if get_request(session, request_id, for_update=True).state == S.VERIFYING:
            purged = purge_superseded_files(settings, session, request_id)
            transition(session, request_id, S.COMPLETED, actor=ACTOR,
                       reason=f"ensemble {result.ensemble_version or '(none trained)'} holds none of the "
                              f"{result.erased_records} erased record(s); deleted {len(purged.shard_versions)} "
                              f"superseded shard version file(s) and {len(purged.checkpoints)} checkpoint(s) "
                              "that held them" + (f" (shards {purged.deferred_shards} wait for another open "
                                                  "request)" if purged.deferred_shards else ""))

def _state_in(engine, request_id: str) -> str:  # noqa: ANN001
    with unit_of_work(engine) as session:
        return get_request(session, request_id).state

def request_summary(request_id: str) -> dict:
    """Counts and ids only: what was found by each method, erased, retrained at what cost."""
    engine = _engine()
    try:
        with unit_of_work(engine) as session:
            request = get_request(session, request_id)
            matches = request_matches(session, request_id)
            jobs = request_jobs(session, request_id)
            shards: dict[int, dict] = {}
            for m in matches:
                if m.erased_in_shard_version is not None:
                    entry = shards.setdefault(m.shard, {"shard": m.shard, "erased": 0, "slices": set(),
                                                        "new_version": m.erased_in_shard_version})
                    entry["erased"] += 1
                    entry["slices"].add(m.slice)
                    entry["new_version"] = max(entry["new_version"], m.erased_in_shard_version)
            return {
                "request_id": request.id,
                "state": request.state,
                "due_at": request.due_at.isoformat(),
                "by_method": per_method_counts(matches),
                "matches": len(matches),
                "review": sum(m.decision == "review" for m in matches),
                "erased": sum(m.erased_in_shard_version is not None for m in matches),
                "kept": sum(m.final_decision == KEEP for m in matches),
                "shards": [{**e, "slices": sorted(e["slices"])} for _, e in sorted(shards.items())],
                "retraining": [_job_dict(j) for j in jobs],
            }
    finally:
        engine.dispose()

def _job_dict(job: ShardRetrainJob) -> dict:
    fraction = (job.samples_processed / job.full_training_samples
                if job.samples_processed is not None and job.full_training_samples else None)
    return {"job_id": job.id, "shard": job.shard, "status": job.status, "shard_version": job.target_shard_version,
            "restored_slice": job.restored_slice, "retrained_from_slice":
                None if job.restored_slice is None else job.restored_slice + 1,
            "samples_processed": job.samples_processed, "full_shard_samples": job.full_training_samples,
            "fraction_of_shard": None if fraction is None else round(fraction, 4),
            "seconds": None if job.wall_seconds is None else round(job.wall_seconds, 3),
            "device": job.device, "ensemble_version": job.ensemble_version_id}

def _unfinished_requests(session, dataset_id: int) -> list:  # noqa: ANN001
    """Requests of the dataset a crash left after retraining: still verifying, or
    completed without a certificate."""

    matched = select(RequestMatch.request_id).where(RequestMatch.dataset_id == dataset_id).distinct()
    return list(session.scalars(select(ErasureRequest).where(
        ErasureRequest.id.in_(matched),
        (ErasureRequest.state == S.VERIFYING)
        | ((ErasureRequest.state == S.COMPLETED) & ErasureRequest.id.not_in(select(Certificate.request_id))),
    ).order_by(ErasureRequest.due_at, ErasureRequest.id)))


def start_processing(request_id: str) -> str:
    """received -> locating; any other state is left as it is (a rerun)."""
    engine = _engine()
    try:
        with unit_of_work(engine) as session:
            request = get_request(session, request_id, for_update=True)
            if request.state == S.RECEIVED:
                transition(session, request_id, S.LOCATING, actor=ACTOR)
            return get_request(session, request_id).state
    finally:
        engine.dispose()

def locate_and_record(request_id: str, dataset: str) -> dict:
    """Locate the subject's records and store the matches, in one transaction with
    the next state: awaiting_review (borderline matches), erasing, or completed."""
    settings = load_settings()
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            request = get_request(session, request_id, for_update=True)
            if request.state != S.LOCATING:
                return {"state": request.state, "located": False}
            ds = dataset_or_fail(session, dataset)
            result = locate_for_request(settings, session, request_id, dataset)
            counts = record_matches(session, request_id, ds.id, result.matches)
            waiting = apply_review_verdicts(session, request_id)
            _after_decisions(session, request_id, waiting,
                             f"{counts['erase']} match(es) to erase, {counts['review']} to review")
            return {"state": get_request(session, request_id).state, "located": True, **counts}
    finally:
        engine.dispose()

def apply_review(request_id: str, decisions: list[dict], reviewer: str, note: str | None) -> dict:
    """Record decisions given with a resume (if any), then move on if every match is decided."""
    engine = _engine()
    try:
        with unit_of_work(engine) as session:
            if get_request(session, request_id).state != S.AWAITING_REVIEW:
                return {"state": get_request(session, request_id).state, "waiting": 0}
            if decisions:
                record_review_decisions(session, request_id,
                                        [ReviewInput(d["match_ref"], d["decision"], note) for d in decisions],
                                        reviewer=reviewer)
            waiting = apply_review_verdicts(session, request_id)
            if not waiting:
                _after_decisions(session, request_id, 0, "review complete")
            return {"state": get_request(session, request_id).state, "waiting": waiting}
    finally:
        engine.dispose()

def apply_review_timeout(request_id: str, policy: str) -> str:
    engine = _engine()
    try:
        with unit_of_work(engine) as session:
            if get_request(session, request_id).state != S.AWAITING_REVIEW:
                return get_request(session, request_id).state
            if policy == "fail":
                transition(session, request_id, S.FAILED, actor=ACTOR, reason="no review decision before the timeout")
            else:
                decided = resolve_undecided(session, request_id, policy)
                _after_decisions(session, request_id, 0, f"review timed out: {decided} undecided match(es) {policy}")
            return get_request(session, request_id).state
    finally:
        engine.dispose()

def erase_records(request_id: str, dataset: str) -> dict:
    """New shard versions without the records (one per affected shard, each under the
    shard's lock), then awaiting_retrain (or verifying when no model saw the shards)."""
    settings = load_settings()
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            if get_request(session, request_id).state != S.ERASING:
                return {"state": get_request(session, request_id).state, "shards": []}
            shards = shards_to_erase(session, request_id, dataset_or_fail(session, dataset).id)
        done = []
        for shard in shards:
            done.append(erase_from_shard(settings, engine, request_id, dataset, shard).to_dict())
            crash_point("erase:after_shard")
        with unit_of_work(engine) as session:
            needs_retrain = bool(request_jobs(session, request_id))
            transition(session, request_id, S.AWAITING_RETRAIN if needs_retrain else S.VERIFYING, actor=ACTOR,
                       reason=f"{sum(d['erased'] for d in done)} record(s) erased from {len(done)} shard(s)")
            return {"state": get_request(session, request_id).state, "shards": done}
    finally:
        engine.dispose()

def shards_awaiting_retraining(request_id: str) -> list[int]:
    engine = _engine()
    try:
        with unit_of_work(engine) as session:
            return sorted({job.shard for job in request_jobs(session, request_id) if job.status != "done"})
    finally:
        engine.dispose()

def verify_and_complete(request_id: str, dataset: str) -> dict:
    """Once every retraining it waits for is done: verify the ensemble in service
    was trained on none of the erased records, measure membership before and after
    (outside any transaction), then complete (samples are purged). Each step is
    idempotent, so a rerun after a crash between any two does the rest."""
    settings = load_settings()
    engine = open_database(settings)
    try:
        state = _enter_verifying(engine, request_id)
        if state != S.VERIFYING:
            return {"state": state, "verification": None, "membership": None}
        crash_point("verify:before")
        verification = _verify_manifest(settings, engine, request_id, dataset)
        membership = None
        if verification.passed:
            membership = probe_membership(settings, engine, request_id, dataset)
            crash_point("verify:after_probe")
            _complete(settings, engine, request_id, verification)
        return {"state": _state_in(engine, request_id), "verification": verification.to_dict(),
                "membership": membership}
    finally:
        engine.dispose()

def certify(request_id: str, dataset: str | None) -> dict | None:
    """Issue the signed certificate of a completed request (once; a rerun returns the
    stored one); None while the request is not completed."""
    settings = load_settings()
    engine = open_database(settings)
    try:
        issued = certify_request(settings, engine, request_id, dataset)
        return issued.to_dict() if issued is not None else None
    finally:
        engine.dispose()

def waiting_requests(dataset: str | None) -> list[tuple[str, str]]:
    engine = _engine()
    try:
        with unit_of_work(engine) as session:
            datasets = ([get_dataset(session, dataset)] if dataset else
                        list(session.scalars(select(Dataset).order_by(Dataset.name))))
            pairs = []
            for ds in datasets:
                if ds is not None:
                    pairs += [(r.id, ds.name) for r in open_requests_waiting(session, ds.id)]
                    pairs += [(r.id, ds.name) for r in _unfinished_requests(session, ds.id)]
            return pairs
    finally:
        engine.dispose()

"""One erasure request's steps, from receipt to certificate, each idempotent.

Every step reads the request's state and recorded matches first and does only what is
left, so running the process again after a crash at any point finishes with the same
result. ``flows/process_request.py`` orders these steps under Prefect.

Every dataset. A request is processed against every dataset (or the ones it named at
intake, or the one an operator names): locating and erasing run per dataset while the
request is ``locating`` / ``erasing``, and ``decide_after_locating`` / ``finish_erasing``
move the request on once every dataset is done; verification checks each dataset's
ensemble before the request completes once.
"""

from __future__ import annotations

import json

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
from db.audit import append_event
from pipeline.lifecycle import (
    RequestState,
    ReviewInput,
    ReviewTicketError,
    TransitionCode,
    get_request,
    record_review_decisions,
    transition,
    verify_review_ticket,
)
from pipeline.extraction import generative_dataset, probe_extraction
from pipeline.membership import probe_membership
from pipeline.placement import request_retrain_estimates

ACTOR = "flow:process-erasure-request"
S = RequestState
C = TransitionCode


def _engine():  # noqa: ANN202
    # One engine per database and process (pipeline/database.py), kept open between steps:
    # disposing it after every step reconnected (and re-read SQLite's schema) on the next.
    return open_database(load_settings())

def request_state(request_id: str) -> str:
    with unit_of_work(_engine()) as session:
        return get_request(session, request_id).state

def _after_decisions(session, request_id: str, waiting: int, code: TransitionCode,  # noqa: ANN001
                     counts: dict[str, int]) -> None:
    """Leave locating/awaiting_review once every match is decided (or wait for review)."""
    state = get_request(session, request_id).state
    if waiting:
        if state == S.LOCATING:
            transition(session, request_id, S.AWAITING_REVIEW, actor=ACTOR, code=C.MATCHES_TO_REVIEW,
                       counts={**counts, "undecided": waiting})
        return
    to_erase = any(m.final_decision == ERASE for m in request_matches(session, request_id))
    if not to_erase and code is C.MATCHES_DECIDED:
        code = C.NOTHING_FOUND
    transition(session, request_id, S.ERASING if to_erase else S.COMPLETED, actor=ACTOR, code=code, counts=counts)

def _enter_verifying(engine, request_id: str) -> str:  # noqa: ANN001
    """awaiting_retrain/retraining -> verifying once every retraining is done; the state after."""
    with unit_of_work(engine) as session:
        state = get_request(session, request_id, for_update=True).state
        if state in (S.AWAITING_RETRAIN, S.RETRAINING) and retraining_done(session, request_id):
            if state == S.AWAITING_RETRAIN:
                transition(session, request_id, S.RETRAINING, actor=ACTOR, code=C.RETRAINED_BY_ANOTHER_RUN)
            transition(session, request_id, S.VERIFYING, actor=ACTOR, code=C.RETRAINED)
            state = S.VERIFYING
        return state

def _verify_manifest(settings, engine, request_id: str, dataset: str) -> Verification:  # noqa: ANN001
    """The training manifest check; a failed one fails the request."""
    with unit_of_work(engine) as session:
        get_request(session, request_id, for_update=True)
        result = verify_request(settings, session, request_id, dataset)
        if not result.passed and get_request(session, request_id).state == S.VERIFYING:
            transition(session, request_id, S.FAILED, actor=ACTOR, code=C.MANIFEST_CHECK_FAILED,
                       counts={"still_in_manifest": result.still_in_manifest})
        return result

def _complete(settings, engine, request_id: str, result: Verification) -> dict | None:  # noqa: ANN001
    """Delete the superseded files that held the erased records, then complete: one
    transaction (a crash before the commit leaves it verifying; the purge is idempotent).
    Then the sweep (``pipeline.gc``): leftovers of killed processes, the database's
    write-ahead log and dead rows; its report, or None when the request did not complete."""
    with unit_of_work(engine) as session:
        if get_request(session, request_id, for_update=True).state == S.VERIFYING:
            purged = purge_superseded_files(settings, session, request_id)
            # The ensemble id and the shards are on the files.purged and ensemble.published events.
            transition(session, request_id, S.COMPLETED, actor=ACTOR, code=C.VERIFIED_AND_PURGED, counts={
                "erased_records": result.erased_records, "shard_versions_purged": len(purged.shard_versions),
                "checkpoints_purged": len(purged.checkpoints), "deferred_shards": len(purged.deferred_shards)})
    return _sweep_once(settings, engine, request_id)


def _sweep_once(settings, engine, request_id: str) -> dict | None:  # noqa: ANN001
    """The completion sweep of a completed request, unless one already ran (a rerun after a
    crash between the completion's commit and its sweep still sweeps)."""
    from db.audit import AuditEvent
    from pipeline.gc import sweep

    with unit_of_work(engine) as session:
        if get_request(session, request_id).state != S.COMPLETED:
            return None
        if session.scalar(select(AuditEvent.id).where(AuditEvent.request_id == str(request_id),
                                                      AuditEvent.kind == "gc.swept").limit(1)) is not None:
            return None
    return sweep(settings, engine, request_id=request_id, actor=ACTOR).to_dict()

def _state_in(engine, request_id: str) -> str:  # noqa: ANN001
    with unit_of_work(engine) as session:
        return get_request(session, request_id).state

def request_summary(request_id: str) -> dict:
    """Counts and ids only: what was found by each method, erased, retrained at what cost
    (over every dataset; ``datasets`` gives the counts of each)."""
    with unit_of_work(_engine()) as session:
        request = get_request(session, request_id)
        matches = request_matches(session, request_id)
        jobs = request_jobs(session, request_id)
        names = {i: n for i, n in session.execute(select(Dataset.id, Dataset.name))}
        per_dataset: dict[str, dict] = {}
        for m in matches:
            entry = per_dataset.setdefault(names[m.dataset_id], {"dataset": names[m.dataset_id], "matches": 0,
                                                                 "erased": 0, "kept": 0})
            entry["matches"] += 1
            entry["erased"] += m.erased_in_shard_version is not None
            entry["kept"] += m.final_decision == KEEP
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
            "retraining": [{**_job_dict(j), "dataset": names[j.dataset_id]} for j in jobs],
            "datasets": [per_dataset[name] for name in sorted(per_dataset)],
            # per dataset: what erasing the matches decided for erasure retrains (the planner's sums)
            "retrain_estimate": request_retrain_estimates(load_settings(), session, matches),
        }

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
    with unit_of_work(_engine()) as session:
        request = get_request(session, request_id, for_update=True)
        if request.state == S.RECEIVED:
            transition(session, request_id, S.LOCATING, actor=ACTOR, code=C.PROCESSING_STARTED)
        return get_request(session, request_id).state

def datasets_to_process(request_id: str, dataset: str | None = None) -> list[str]:
    """The datasets the request is processed against, by name: ``dataset`` when given, else
    those the request named at intake, else every dataset; with every dataset it already has
    matches in (a rerun finishes what an earlier run started)."""
    with unit_of_work(_engine()) as session:
        request = get_request(session, request_id)
        named = json.loads(request.datasets) if request.datasets else None
        if dataset is not None:
            if named is not None and dataset not in named:
                raise ValueError(f"request {request_id} covers the datasets {', '.join(named)}, "
                                 f"not {dataset!r}; leave the dataset out to process those")
            wanted = [dataset_or_fail(session, dataset).name]
        elif named is not None:
            wanted = [dataset_or_fail(session, name).name for name in named]
        else:
            wanted = list(session.scalars(select(Dataset.name).order_by(Dataset.name)))
            if not wanted:
                raise LookupError("no dataset is ingested yet, so there is nothing to search; "
                                  "ingest a file first (`erasure ingest FILE`)")
        matched = session.scalars(select(Dataset.name).join(RequestMatch, RequestMatch.dataset_id == Dataset.id)
                                  .where(RequestMatch.request_id == str(request_id)).distinct())
        return sorted(set(wanted) | set(matched))


def _datasets_with_erasures(session, request_id: str) -> list[Dataset]:  # noqa: ANN001
    ids = {m.dataset_id for m in request_matches(session, request_id) if m.erased_in_shard_version is not None}
    return sorted((session.get(Dataset, i) for i in ids), key=lambda d: d.name)


def locate_and_record(request_id: str, dataset: str) -> dict:
    """Locate the subject's records in one dataset and store the matches, while the request
    is locating (idempotent: a match already recorded is kept as it is)."""
    settings = load_settings()
    with unit_of_work(open_database(settings)) as session:
        request = get_request(session, request_id, for_update=True)
        if request.state != S.LOCATING:
            return {"dataset": dataset, "state": request.state, "located": False}
        ds = dataset_or_fail(session, dataset)
        result = locate_for_request(settings, session, request_id, dataset)
        counts = record_matches(session, request_id, ds.id, result.matches)
        request.sample_only_policy = result.thresholds.sample_only.value  # stated in the certificate
        # which datasets were searched, found or not: the certificate has a section for each
        append_event(session, "dataset.searched", {"dataset_id": ds.id, "erase": counts["erase"],
                                                   "review": counts["review"]},
                     actor=ACTOR, request_id=str(request_id))
        return {"dataset": dataset, "state": request.state, "located": True, **counts}


def decide_after_locating(request_id: str) -> dict:
    """Once every dataset is searched, the next state: awaiting_review (borderline matches),
    erasing, or completed (nothing found)."""
    with unit_of_work(_engine()) as session:
        if get_request(session, request_id, for_update=True).state != S.LOCATING:
            return {"state": get_request(session, request_id).state}
        matches = request_matches(session, request_id)
        counts = {"erase": sum(m.decision == ERASE for m in matches),
                  "review": sum(m.decision == "review" for m in matches)}
        waiting = apply_review_verdicts(session, request_id)
        _after_decisions(session, request_id, waiting, C.MATCHES_DECIDED, counts)
        return {"state": get_request(session, request_id).state, **counts}

def apply_review(request_id: str, decisions: list[dict], ticket: str | None = None, note: str | None = None) -> dict:
    """Record decisions given with a resume (if any), then move on if every match is decided.

    Decisions are applied only with a valid review ticket (issued by the API to the
    reviewer it authenticated, for exactly these decisions): the ticket names the
    reviewer. Without one nothing is recorded, the refusal is logged, and the answer
    has ``refused`` (a code); without decisions, those recorded through the API are read."""
    settings = load_settings()
    with unit_of_work(open_database(settings)) as session:
        if get_request(session, request_id, for_update=True).state != S.AWAITING_REVIEW:
            return {"state": get_request(session, request_id).state, "waiting": 0, "refused": None}
        if decisions:
            key = settings.secret_key_bytes()
            pairs = [(d["match_ref"], d["decision"]) for d in decisions]
            try:
                reviewer = verify_review_ticket(key, ticket, request_id, pairs, note)
            except ReviewTicketError as exc:
                append_event(session, "review.resume_refused", {"decisions": len(pairs), "problem": exc.problem},
                             actor=ACTOR, request_id=str(request_id))
                return {"state": S.AWAITING_REVIEW, "waiting": apply_review_verdicts(session, request_id),
                        "refused": exc.problem}
            record_review_decisions(session, request_id, [ReviewInput(r, d, note) for r, d in pairs],
                                    reviewer=reviewer, key=key)
        waiting = apply_review_verdicts(session, request_id)
        if not waiting:
            _after_decisions(session, request_id, 0, C.REVIEW_COMPLETE, {})
        return {"state": get_request(session, request_id).state, "waiting": waiting, "refused": None}

def apply_review_timeout(request_id: str, policy: str) -> str:
    with unit_of_work(_engine()) as session:
        if get_request(session, request_id).state != S.AWAITING_REVIEW:
            return get_request(session, request_id).state
        if policy == "fail":
            transition(session, request_id, S.FAILED, actor=ACTOR, code=C.REVIEW_TIMEOUT_FAILED)
        else:
            decided = resolve_undecided(session, request_id, policy)
            _after_decisions(session, request_id, 0, C.REVIEW_TIMEOUT_DECIDED,
                             {"decided": decided, "erase" if policy == ERASE else "keep": decided})
        return get_request(session, request_id).state

def erase_records(request_id: str, dataset: str) -> dict:
    """New shard versions of one dataset without the request's records (one per affected
    shard, each under the shard's lock), while the request is erasing."""
    settings = load_settings()
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        if get_request(session, request_id).state != S.ERASING:
            return {"dataset": dataset, "state": get_request(session, request_id).state, "shards": []}
        shards = shards_to_erase(session, request_id, dataset_or_fail(session, dataset).id)
    done = []
    for shard in shards:
        done.append(erase_from_shard(settings, engine, request_id, dataset, shard).to_dict())
        crash_point("erase:after_shard")
    return {"dataset": dataset, "state": S.ERASING, "shards": done}


def finish_erasing(request_id: str) -> dict:
    """Once every dataset's records are erased: awaiting_retrain (or verifying when no model
    saw the shards). A record still to erase (a dataset left out) is an error, not a skip."""
    with unit_of_work(_engine()) as session:
        if get_request(session, request_id, for_update=True).state != S.ERASING:
            return {"state": get_request(session, request_id).state}
        matches = request_matches(session, request_id)
        left = [m for m in matches if m.final_decision == ERASE and m.erased_in_shard_version is None]
        if left:
            names = sorted({session.get(Dataset, m.dataset_id).name for m in left})
            raise RuntimeError(f"request {request_id} still has {len(left)} record(s) to erase in "
                               f"{', '.join(names)}; process it for every dataset it has matches in")
        erased = [m for m in matches if m.erased_in_shard_version is not None]
        needs_retrain = bool(request_jobs(session, request_id))
        transition(session, request_id, S.AWAITING_RETRAIN if needs_retrain else S.VERIFYING, actor=ACTOR,
                   code=C.RECORDS_ERASED,
                   counts={"records": len(erased), "shards": len({(m.dataset_id, m.shard) for m in erased})})
        return {"state": get_request(session, request_id).state}


def shards_awaiting_retraining(request_id: str, dataset: str | None = None) -> list[int]:
    """The shards (of ``dataset`` when given) whose retraining the request still waits for."""
    with unit_of_work(_engine()) as session:
        dataset_id = dataset_or_fail(session, dataset).id if dataset is not None else None
        return sorted({job.shard for job in request_jobs(session, request_id)
                       if job.status != "done" and (dataset_id is None or job.dataset_id == dataset_id)})

def verify_and_complete(request_id: str) -> dict:
    """Once every retraining it waits for is done: verify, in every dataset it erased from,
    that the ensemble in service was trained on none of the erased records, measure
    membership before and after (outside any transaction), then complete (samples are
    purged). Each step is idempotent, so a rerun after a crash between any two does the
    rest. ``verification`` and ``membership`` are keyed by dataset name."""
    settings = load_settings()
    engine = open_database(settings)
    state = _enter_verifying(engine, request_id)
    if state != S.VERIFYING:
        swept = _sweep_once(settings, engine, request_id) if state == S.COMPLETED else None
        return {"state": state, "verification": None, "membership": None, **({"sweep": swept} if swept else {})}
    crash_point("verify:before")
    with unit_of_work(engine) as session:
        names = [ds.name for ds in _datasets_with_erasures(session, request_id)]
    verifications: dict[str, Verification] = {}
    for name in names:
        verifications[name] = _verify_manifest(settings, engine, request_id, name)
        if not verifications[name].passed:  # the request failed; the other datasets need no check
            return {"state": _state_in(engine, request_id),
                    "verification": {n: v.to_dict() for n, v in verifications.items()},
                    "membership": None, "sweep": None}
    membership = {name: probe_membership(settings, engine, request_id, name) for name in names
                  if not generative_dataset(settings, engine, name)}
    extraction = {name: found for name in names  # front end: only a generative ensemble has text to extract
                  if (found := probe_extraction(settings, engine, request_id, name)) is not None}
    crash_point("verify:after_probe")
    swept = _complete(settings, engine, request_id, _all_verified(verifications))
    return {"state": _state_in(engine, request_id),
            "verification": {n: v.to_dict() for n, v in verifications.items()},
            "membership": membership, "extraction": extraction, "sweep": swept}


def _all_verified(verifications: dict[str, Verification]) -> Verification:
    """The manifest checks of every dataset as one (the completion records the totals)."""
    versions = [v.ensemble_version for _, v in sorted(verifications.items()) if v.ensemble_version]
    return Verification(all(v.passed for v in verifications.values()), ",".join(versions) or None,
                        sum(v.erased_records for v in verifications.values()),
                        sum(v.still_in_manifest for v in verifications.values()))


def certify(request_id: str, prefect_records=None) -> dict | None:  # noqa: ANN001
    """Issue the signed certificate of a completed request, a section per dataset (once; a
    rerun returns the stored one); None while the request is not completed."""
    settings = load_settings()
    engine = open_database(settings)
    # Every completion is swept before its certificate, also one with nothing to erase
    # (its samples were purged too) or one whose completion sweep a crash cut off.
    _sweep_once(settings, engine, request_id)
    issued = certify_request(settings, engine, request_id, prefect_records=prefect_records)
    return issued.to_dict() if issued is not None else None


def waiting_requests(dataset: str | None) -> list[str]:
    """Requests (with matches in ``dataset`` when given) waiting for retraining, still
    verifying, or completed without a certificate; each once, earliest deadline first."""
    with unit_of_work(_engine()) as session:
        datasets = ([get_dataset(session, dataset)] if dataset else
                    list(session.scalars(select(Dataset).order_by(Dataset.name))))
        found: dict[str, object] = {}
        for ds in datasets:
            if ds is not None:
                for r in [*open_requests_waiting(session, ds.id), *_unfinished_requests(session, ds.id)]:
                    found.setdefault(r.id, (r.due_at, r.id))
        return sorted(found, key=lambda rid: found[rid])

"""Compliance audit queries: what a regulator asks, answered from the lineage.

Pure SQLAlchemy over a ``Session``; every answer is made of ids, counts, states
and times (never an identifier value or a text). Each query touches only
indexed rows of the subject, request or ensemble asked about, so it stays fast
however many records the datasets hold (``benchmarks/bench_audit.py``).

- ``request_timeline``: a request's events in time order, from the hash-chained
  audit log (``audit_events``) merged with its state history (``request_events``);
  an event written to both appears once, and the state history alone still
  gives a full timeline for requests from before the audit log. The texts a
  person typed (``request_notes``) are joined in while they exist; once purged
  an entry still shows the note's kind and keyed hash.
- ``due_requests``: open requests past their Art. 12(3) deadline, and those due
  within a window.
- ``subject_lineage``: every record that ever held a subject's data (by keyed
  identifier hash, plus the copies that erasure requests naming those hashes
  matched) and every shard version, checkpoint and ensemble version that held it.
- ``ensemble_reflections``: the erasure requests an ensemble version reflects.

Which data a model artefact held follows from the lineage alone: record ``r``
lives in shard ``s`` for versions ``first_shard_version <= v < erased_in_shard_version``;
a checkpoint of shard ``s`` after slice ``k`` first trained for shard version
``v`` was trained on ``r`` iff ``k >= r.slice`` and ``v`` is in that range
(checkpoints train cumulatively, slice by slice, and one reused by a later
version kept the version it was first trained for); an ensemble version holds
``r`` iff one of its members is such a checkpoint.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, func, literal, or_, select
from sqlalchemy.orm import Session, aliased

from db.audit import AuditEvent
from db.models import Dataset, Record, RecordIdentifier, ShardVersion
from db.requests import ErasureRequest, RequestEvent, RequestIdentifier, RequestNote
from db.training import JOB_DONE, Checkpoint, EnsembleMemberRow, EnsembleVersionRow, RequestMatch, ShardRetrainJob
from db.upstream import UpstreamAction, open_upstream_actions

_CHUNK = 500  # ids per IN list
MAX_LINEAGE_DEPTH = 100_000  # ensemble ancestry is a chain of content hashes; a guard, not a limit in practice


class AuditNotFound(LookupError):
    """The request, dataset or ensemble version asked about does not exist."""


class AuditQueryError(ValueError):
    """A question that cannot be answered as asked; ``field`` names the input to fix."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _dataset_id(session: Session, name: str) -> int:
    found = session.scalar(select(Dataset.id).where(Dataset.name == name))
    if found is None:
        raise AuditNotFound(f"no dataset named {name!r}")
    return found


# ---------------------------------------------------------------- a. timeline


@dataclass(frozen=True)
class TimelineEntry:
    """One event. ``kind`` uses the audit log's names (``request.transition``,
    ``shard.erased``, ...); a state-history line ``action`` is ``request.<action>``.
    ``source``: ``audit_log``, ``request_events`` or ``both`` (one event, written
    to the two tables). ``details`` are the audit event's ids and counts.
    ``notes``: the texts a person typed with it (``{id, kind, hmac, text}``),
    ``text`` None once the request's notes are purged."""

    at: datetime
    actor: str
    kind: str
    from_state: str | None
    to_state: str | None
    reason: str | None
    source: str
    audit_event_id: int | None
    request_event_id: int | None
    details: dict
    notes: tuple[dict, ...] = ()


@dataclass(frozen=True)
class RequestTimeline:
    request_id: str
    state: str
    received_at: datetime
    original_due_at: datetime
    due_at: datetime
    closed_at: datetime | None
    overdue: bool
    audit_log_events: int  # events of this request on the audit log
    state_history_events: int  # lines of its request_events
    entries: tuple[TimelineEntry, ...]


_STATE_KEYS = ("from_state", "to_state", "reason")


def request_timeline(session: Session, request_id: str, now: datetime | None = None) -> RequestTimeline:
    """The request's timeline, oldest first.

    A state change written to both tables (same kind, time, actor and states)
    is one entry (``source`` ``both``); audit events with no state-history line
    (matches recorded, shards erased, ...) and state-history lines with no audit
    event (requests older than the audit log) appear from their one table.
    """
    request = session.get(ErasureRequest, str(request_id))
    if request is None:
        raise AuditNotFound(f"no erasure request with id {request_id}")
    now = now or datetime.now(timezone.utc)
    history = session.scalars(
        select(RequestEvent).where(RequestEvent.request_id == request.id).order_by(RequestEvent.id)
    ).all()
    logged = session.scalars(
        select(AuditEvent).where(AuditEvent.request_id == request.id).order_by(AuditEvent.id)
    ).all()

    texts = dict(session.execute(
        select(RequestNote.id, RequestNote.text).where(RequestNote.request_id == request.id)).tuples().all())
    entries: list[TimelineEntry] = []
    unmatched: dict[tuple, list[RequestEvent]] = defaultdict(list)
    for event in history:
        unmatched[(f"request.{event.action}", event.at, event.actor, event.from_state, event.to_state)].append(event)
    for event in logged:
        details = _details(event.details)
        states = {key: details.pop(key, None) for key in _STATE_KEYS}
        refs = details.pop("notes") if isinstance(details.get("notes"), list) else ()
        notes = tuple({**ref, "text": texts.get(ref.get("id"))} for ref in refs if isinstance(ref, dict))
        key = (event.kind, event.at, event.actor, states["from_state"], states["to_state"])
        twin = unmatched[key].pop(0) if unmatched.get(key) else None
        entries.append(TimelineEntry(
            at=event.at, actor=event.actor, kind=event.kind, from_state=states["from_state"],
            to_state=states["to_state"], reason=states["reason"] if twin is None else twin.reason,
            source="audit_log" if twin is None else "both", audit_event_id=event.id,
            request_event_id=None if twin is None else twin.id, details=details, notes=notes,
        ))
    for events in unmatched.values():
        for event in events:
            entries.append(TimelineEntry(
                at=event.at, actor=event.actor, kind=f"request.{event.action}", from_state=event.from_state,
                to_state=event.to_state, reason=event.reason, source="request_events", audit_event_id=None,
                request_event_id=event.id, details={},
            ))
    # time order; within one instant the state history's order (it is written in sequence)
    entries.sort(key=lambda e: (e.at, e.request_event_id if e.request_event_id is not None else 1 << 62,
                                e.audit_event_id or 0))
    return RequestTimeline(
        request_id=request.id, state=request.state, received_at=request.received_at,
        original_due_at=request.original_due_at, due_at=request.due_at, closed_at=request.closed_at,
        overdue=request.closed_at is None and request.due_at < now, audit_log_events=len(logged),
        state_history_events=len(history), entries=tuple(entries),
    )


def _details(raw: str) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


# ---------------------------------------------------------------- b. deadlines


@dataclass(frozen=True)
class DueRequest:
    request_id: str
    state: str
    received_at: datetime
    due_at: datetime
    extension_months: int
    days_left: float  # negative when overdue


@dataclass(frozen=True)
class DueReport:
    now: datetime
    within_days: int
    overdue: tuple[DueRequest, ...]  # earliest deadline first
    due_soon: tuple[DueRequest, ...]  # not overdue; due before now + within_days
    # source files that still hold erased subjects' rows upstream, until an operator marks them done
    upstream_open: tuple[UpstreamAction, ...] = ()


def due_requests(session: Session, *, open_states: Iterable[str], within_days: int = 7,
                 now: datetime | None = None) -> DueReport:
    """Open requests (state in ``open_states``: the state machine's, passed by the
    caller) that are overdue, and those due within ``within_days`` days.
    One range scan of ``ix_erasure_requests_state_due_at`` per state."""
    if isinstance(within_days, bool) or not isinstance(within_days, int) or not 0 <= within_days <= 366:
        raise AuditQueryError("within_days is a whole number of days from 0 to 366", "within_days")
    now = now or datetime.now(timezone.utc)
    horizon = now + timedelta(days=within_days)
    rows = session.execute(
        select(ErasureRequest.id, ErasureRequest.state, ErasureRequest.received_at, ErasureRequest.due_at,
               ErasureRequest.extension_months)
        .where(ErasureRequest.state.in_(sorted(set(open_states))), ErasureRequest.due_at < horizon)
        .order_by(ErasureRequest.due_at, ErasureRequest.id)
    ).all()
    overdue, soon = [], []
    for row in rows:
        item = DueRequest(row.id, row.state, row.received_at, row.due_at, row.extension_months,
                          round((row.due_at - now).total_seconds() / 86400, 3))
        (overdue if row.due_at < now else soon).append(item)
    return DueReport(now, within_days, tuple(overdue), tuple(soon), tuple(open_upstream_actions(session)))


# ---------------------------------------------------------------- c. a subject's records


@dataclass(frozen=True)
class MatchRef:
    """How an erasure request matched the record (no content)."""

    request_id: str
    method: str
    decision: str
    final_decision: str | None
    erased_in_shard_version: int | None


@dataclass(frozen=True)
class CheckpointRef:
    key: str
    slice: int
    shard_version: int
    created_at: datetime


@dataclass(frozen=True)
class EnsembleRef:
    version_id: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class SubjectRecord:
    dataset: str
    record_id: str
    shard: int
    slice: int
    first_shard_version: int
    erased_in_shard_version: int | None
    found_by: tuple[str, ...]  # "identifier" and/or "request_match"
    matches: tuple[MatchRef, ...]
    shard_versions: tuple[int, ...]  # every version of the shard that held it
    checkpoints: tuple[CheckpointRef, ...]  # every checkpoint trained on it
    ensemble_versions: tuple[EnsembleRef, ...]  # every ensemble version with such a checkpoint
    current_shard_version: int | None
    in_current_shard_version: bool
    current_ensemble_version: str | None
    in_current_ensemble: bool


@dataclass(frozen=True)
class SubjectLineage:
    identifiers: int  # how many (kind, keyed hash) pairs were asked about
    requests: tuple[str, ...]  # erasure requests naming any of them
    records: tuple[SubjectRecord, ...]
    erased: int
    in_current_shard_versions: int
    in_current_ensembles: int
    ensemble_versions: tuple[str, ...]  # every ensemble version that ever held any of the records


def _pairs_clause(kind_col, hash_col, hashes: Sequence[tuple[str, str]]):  # noqa: ANN001, ANN202
    return or_(*(and_(kind_col == kind, hash_col == digest) for kind, digest in hashes))


def subject_lineage(session: Session, hashes: Sequence[tuple[str, str]], *, dataset: str | None = None) -> SubjectLineage:
    """Every record that ever contained the subject's data, and where it went.

    ``hashes`` are (kind, HMAC-SHA256 keyed hash) pairs, computed exactly as
    ingest and intake compute them. The records are those carrying one of the
    hashes (``record_identifiers``) and those matched for an erasure request that
    names one (``request_identifiers`` -> ``request_matches``: copies and
    near-copies without identifiers; all matches, also the ones a reviewer kept,
    with their decisions). For each record: the shard versions that held it
    (``first <= v < erased_in``), the checkpoints trained on it (same shard,
    slice >= the record's, first trained for such a version), the ensemble
    versions with one of those checkpoints as a member, and whether the shard's
    newest version and the dataset's newest ensemble version still hold it.
    """
    hashes = sorted(set(hashes))
    dataset_id = _dataset_id(session, dataset) if dataset is not None else None
    if not hashes:
        raise AuditQueryError("give at least one identifier", "identifiers")

    found: dict[tuple[int, str], set[str]] = defaultdict(set)
    query = select(RecordIdentifier.dataset_id, RecordIdentifier.record_id).where(
        _pairs_clause(RecordIdentifier.kind, RecordIdentifier.keyed_hash, hashes))
    if dataset_id is not None:
        query = query.where(RecordIdentifier.dataset_id == dataset_id)
    for ds, rid in session.execute(query):
        found[(ds, rid)].add("identifier")

    request_ids = sorted(session.scalars(
        select(RequestIdentifier.request_id).where(
            _pairs_clause(RequestIdentifier.kind, RequestIdentifier.keyed_hash, hashes)).distinct()
    ))
    matches: dict[tuple[int, str], list[MatchRef]] = defaultdict(list)
    for chunk in _chunks(request_ids):
        query = select(RequestMatch).where(RequestMatch.request_id.in_(chunk))
        if dataset_id is not None:
            query = query.where(RequestMatch.dataset_id == dataset_id)
        for m in session.scalars(query):
            found[(m.dataset_id, m.record_id)].add("request_match")
            matches[(m.dataset_id, m.record_id)].append(
                MatchRef(m.request_id, m.method, m.decision, m.final_decision, m.erased_in_shard_version))

    records: list[Record] = []
    by_dataset: dict[int, list[str]] = defaultdict(list)
    for ds, rid in sorted(found):
        by_dataset[ds].append(rid)
    for ds, rids in by_dataset.items():
        for chunk in _chunks(rids):
            records += session.scalars(select(Record).where(Record.dataset_id == ds, Record.record_id.in_(chunk)))
    if not records:
        return SubjectLineage(len(hashes), tuple(request_ids), (), 0, 0, 0, ())

    # Per (dataset, shard): the lowest version and slice any of its records needs.
    need: dict[tuple[int, int], tuple[int, int]] = {}
    for r in records:
        low_v, low_s = need.get((r.dataset_id, r.shard), (r.first_shard_version, r.slice))
        need[(r.dataset_id, r.shard)] = (min(low_v, r.first_shard_version), min(low_s, r.slice))
    shard_keys = sorted(need)

    versions: dict[tuple[int, int], list[int]] = defaultdict(list)
    checkpoints: dict[tuple[int, int], list[CheckpointRef]] = defaultdict(list)
    for chunk in _chunks(shard_keys, 100):
        for ds, shard, version in session.execute(
            select(ShardVersion.dataset_id, ShardVersion.shard, ShardVersion.version).where(or_(*(
                and_(ShardVersion.dataset_id == ds, ShardVersion.shard == s, ShardVersion.version >= need[(ds, s)][0])
                for ds, s in chunk)))
        ):
            versions[(ds, shard)].append(version)
        for c in session.execute(
            select(Checkpoint.dataset_id, Checkpoint.shard, Checkpoint.key, Checkpoint.slice, Checkpoint.shard_version,
                   Checkpoint.created_at).where(or_(*(
                and_(Checkpoint.dataset_id == ds, Checkpoint.shard == s, Checkpoint.shard_version >= need[(ds, s)][0],
                     Checkpoint.slice >= need[(ds, s)][1])
                for ds, s in chunk)))
        ):
            checkpoints[(c.dataset_id, c.shard)].append(CheckpointRef(c.key, c.slice, c.shard_version, c.created_at))

    keys_by_dataset: dict[int, list[str]] = defaultdict(list)
    for (ds, _), refs in checkpoints.items():
        keys_by_dataset[ds] += [c.key for c in refs]
    ensembles_of: dict[tuple[int, str], list[EnsembleRef]] = defaultdict(list)
    for ds, keys in keys_by_dataset.items():
        for chunk in _chunks(sorted(set(keys))):
            for key, version_id, created_by, created_at in session.execute(
                select(EnsembleMemberRow.checkpoint_key, EnsembleVersionRow.version_id, EnsembleVersionRow.created_by,
                       EnsembleVersionRow.created_at)
                .join(EnsembleVersionRow, EnsembleVersionRow.id == EnsembleMemberRow.ensemble_id)
                .where(EnsembleMemberRow.dataset_id == ds, EnsembleMemberRow.checkpoint_key.in_(chunk))
                .order_by(EnsembleVersionRow.id)
            ):
                ensembles_of[(ds, key)].append(EnsembleRef(version_id, created_by, created_at))

    datasets = sorted({r.dataset_id for r in records})
    names = dict(session.execute(select(Dataset.id, Dataset.name).where(Dataset.id.in_(datasets))).all())
    current_ensemble = _current_ensembles(session, datasets)

    out: list[SubjectRecord] = []
    every_ensemble: dict[str, None] = {}
    for r in sorted(records, key=lambda r: (names[r.dataset_id], r.shard, r.record_id)):
        end = r.erased_in_shard_version

        def held(version: int, r: Record = r, end: int | None = end) -> bool:
            return version >= r.first_shard_version and (end is None or version < end)

        shard_versions = sorted(v for v in versions[(r.dataset_id, r.shard)] if held(v))
        held_checkpoints = sorted((c for c in checkpoints[(r.dataset_id, r.shard)]
                                   if c.slice >= r.slice and held(c.shard_version)),
                                  key=lambda c: (c.shard_version, c.slice, c.key))
        ensembles: dict[str, EnsembleRef] = {}
        for c in held_checkpoints:
            for e in ensembles_of[(r.dataset_id, c.key)]:
                ensembles.setdefault(e.version_id, e)
        ordered = tuple(sorted(ensembles.values(), key=lambda e: (e.created_at, e.version_id)))
        every_ensemble.update(dict.fromkeys(e.version_id for e in ordered))
        current_version = max(versions[(r.dataset_id, r.shard)], default=None)
        current = current_ensemble.get(r.dataset_id)
        out.append(SubjectRecord(
            dataset=names[r.dataset_id], record_id=r.record_id, shard=r.shard, slice=r.slice,
            first_shard_version=r.first_shard_version, erased_in_shard_version=end,
            found_by=tuple(sorted(found[(r.dataset_id, r.record_id)])),
            matches=tuple(sorted(matches.get((r.dataset_id, r.record_id), []), key=lambda m: m.request_id)),
            shard_versions=tuple(shard_versions), checkpoints=tuple(held_checkpoints), ensemble_versions=ordered,
            current_shard_version=current_version,
            in_current_shard_version=current_version is not None and held(current_version),
            current_ensemble_version=current, in_current_ensemble=current is not None and current in ensembles,
        ))
    return SubjectLineage(
        identifiers=len(hashes), requests=tuple(request_ids), records=tuple(out),
        erased=sum(r.erased_in_shard_version is not None for r in out),
        in_current_shard_versions=sum(r.in_current_shard_version for r in out),
        in_current_ensembles=sum(r.in_current_ensemble for r in out),
        ensemble_versions=tuple(every_ensemble),
    )


def _current_ensembles(session: Session, dataset_ids: Sequence[int]) -> dict[int, str]:
    """dataset id -> the version id of its ensemble in service (its newest row)."""
    newest = (select(func.max(EnsembleVersionRow.id)).where(EnsembleVersionRow.dataset_id.in_(dataset_ids))
              .group_by(EnsembleVersionRow.dataset_id))
    return dict(session.execute(
        select(EnsembleVersionRow.dataset_id, EnsembleVersionRow.version_id).where(EnsembleVersionRow.id.in_(newest))
    ).all())


# ---------------------------------------------------------------- d. what an ensemble version reflects


@dataclass(frozen=True)
class ReflectedRequest:
    request_id: str
    state: str
    retrain_jobs: tuple[int, ...]  # the jobs that retrained its shards
    produced: tuple[str, ...]  # the ensemble versions those jobs published (this one or ancestors)
    erased_records: int
    still_held: int  # its erased records that this version's checkpoints hold, by the lineage (0 expected)


@dataclass(frozen=True)
class HeldRequest:
    request_id: str
    state: str
    erased_records_held: int


@dataclass(frozen=True)
class EnsembleReflections:
    dataset: str
    version_id: str
    parent_version_id: str | None
    created_by: str
    created_at: datetime
    is_current: bool
    lineage: tuple[str, ...]  # this version, its parent, ... back to the first
    reflected: tuple[ReflectedRequest, ...]
    still_holding: tuple[HeldRequest, ...]  # requests whose erased records this version still holds


def ensemble_reflections(session: Session, version_id: str, *, dataset: str | None = None) -> EnsembleReflections:
    """The erasure requests ensemble version ``E`` reflects, precisely:

    Let ``lineage(E)`` be ``E`` and its ancestors (``parent_version_id`` within
    the dataset) and ``J`` the ``done`` retraining jobs that published a version
    in ``lineage(E)``. A request is *reflected* by ``E`` iff one of its matches
    in the dataset was retrained by a job in ``J``, and every match it erased
    there (``erased_in_shard_version`` set) either was retrained by a job in
    ``J`` or needed no retraining (no sub-model in service had its shard: no
    job). So every sub-model of ``E`` that could have seen the request's erased
    records was trained after they were removed. ``still_held`` checks that
    independently from the lineage (records vs. ``E``'s member checkpoints) and
    is 0 for a consistent history.

    ``still_holding`` lists the requests whose erased records ``E``'s member
    checkpoints were trained on (erasures ``E`` predates, or retrainings still
    pending): what ``E`` does not reflect.
    """
    query = select(EnsembleVersionRow).where(EnsembleVersionRow.version_id == version_id)
    if dataset is not None:
        query = query.where(EnsembleVersionRow.dataset_id == _dataset_id(session, dataset))
    rows = session.scalars(query.limit(2)).all()
    if not rows:
        where = f" of dataset {dataset!r}" if dataset is not None else ""
        raise AuditNotFound(f"no ensemble version {version_id}{where}")
    if len(rows) > 1:
        raise AuditQueryError(f"ensemble version {version_id} exists in several datasets; name one", "dataset")
    row = rows[0]
    name = session.scalar(select(Dataset.name).where(Dataset.id == row.dataset_id))

    lineage = _lineage(session, row)
    jobs = session.execute(
        select(ShardRetrainJob.id, ShardRetrainJob.ensemble_version_id).where(
            ShardRetrainJob.dataset_id == row.dataset_id, ShardRetrainJob.status == JOB_DONE,
            ShardRetrainJob.ensemble_version_id.in_(select(lineage.c.version_id)))
    ).all()
    produced_by = {job_id: version for job_id, version in jobs}

    # every erased match of the dataset by request and job (one range scan of the dataset's erased matches)
    per_request: dict[str, dict[int | None, int]] = defaultdict(dict)
    states: dict[str, str] = {}
    if produced_by:
        grouped = (select(RequestMatch.request_id, RequestMatch.retrain_job_id, func.count().label("n"))
                   .where(RequestMatch.dataset_id == row.dataset_id, RequestMatch.erased_in_shard_version.is_not(None))
                   .group_by(RequestMatch.request_id, RequestMatch.retrain_job_id).subquery())
        for request_id, state, job_id, count in session.execute(
            select(grouped.c.request_id, ErasureRequest.state, grouped.c.retrain_job_id, grouped.c.n)
            .join(ErasureRequest, ErasureRequest.id == grouped.c.request_id)
        ):
            per_request[request_id][job_id] = count
            states[request_id] = state

    held = _erased_records_held(session, row)
    states.update((request_id, state) for request_id, (state, _) in held.items())
    reflected = []
    for request_id, by_job in sorted(per_request.items()):
        job_ids = [j for j in by_job if j is not None]
        if job_ids and all(j in produced_by for j in job_ids):
            reflected.append(ReflectedRequest(
                request_id=request_id, state=states[request_id], retrain_jobs=tuple(sorted(job_ids)),
                produced=tuple(sorted({produced_by[j] for j in job_ids})), erased_records=sum(by_job.values()),
                still_held=held.get(request_id, ("", 0))[1],
            ))
    current = _current_ensembles(session, [row.dataset_id]).get(row.dataset_id)
    return EnsembleReflections(
        dataset=name, version_id=row.version_id, parent_version_id=row.parent_version_id, created_by=row.created_by,
        created_at=row.created_at, is_current=current == row.version_id,
        lineage=tuple(session.scalars(select(lineage.c.version_id).order_by(lineage.c.depth))),
        reflected=tuple(reflected),
        still_holding=tuple(HeldRequest(rid, state, n) for rid, (state, n) in sorted(held.items())),
    )


def _lineage(session: Session, row: EnsembleVersionRow):  # noqa: ANN202
    """A recursive CTE (version_id, depth) of ``row`` and its ancestors, depth 0 first."""
    chain = (select(EnsembleVersionRow.dataset_id, EnsembleVersionRow.version_id,
                    EnsembleVersionRow.parent_version_id, literal(0).label("depth"))
             .where(EnsembleVersionRow.id == row.id).cte("ensemble_lineage", recursive=True))
    parent = aliased(EnsembleVersionRow)
    return chain.union_all(
        select(parent.dataset_id, parent.version_id, parent.parent_version_id, chain.c.depth + 1)
        .join(chain, and_(parent.dataset_id == chain.c.dataset_id, parent.version_id == chain.c.parent_version_id))
        .where(chain.c.depth < MAX_LINEAGE_DEPTH)
    )


def _erased_records_held(session: Session, row: EnsembleVersionRow) -> dict[str, tuple[str, int]]:
    """request id -> (its state, how many of its erased records a member checkpoint of ``row`` was trained on).

    Driven by the members: for each (shard, slice, shard version) of a member
    checkpoint, the shard's matches erased after that version (a range of
    ``ix_request_matches_dataset_shard_erased``) in a slice it covers, then the
    record's own first version and erasure (primary key lookups)."""
    r, m, c = Record, EnsembleMemberRow, Checkpoint
    members = (select(m.shard, c.slice, c.shard_version)
               .join(c, and_(c.dataset_id == m.dataset_id, c.key == m.checkpoint_key))
               .where(m.ensemble_id == row.id).subquery())
    # one row per (request, record): a record has one member (its shard's) and one match per request
    grouped = (
        select(RequestMatch.request_id, func.count().label("n"))
        .join(members, and_(RequestMatch.shard == members.c.shard,
                            RequestMatch.erased_in_shard_version > members.c.shard_version,
                            RequestMatch.slice <= members.c.slice))
        .join(r, and_(r.dataset_id == RequestMatch.dataset_id, r.record_id == RequestMatch.record_id))
        .where(
            RequestMatch.dataset_id == row.dataset_id,
            r.shard == members.c.shard,
            r.slice <= members.c.slice,
            r.first_shard_version <= members.c.shard_version,
            or_(r.erased_in_shard_version.is_(None), members.c.shard_version < r.erased_in_shard_version),
        )
        .group_by(RequestMatch.request_id)
        .subquery()
    )
    query = select(grouped.c.request_id, ErasureRequest.state, grouped.c.n).join(
        ErasureRequest, ErasureRequest.id == grouped.c.request_id)
    return {request_id: (state, count) for request_id, state, count in session.execute(query)}

"""Read queries behind the compliance console's tables: a page of requests by
deadline, match counts per method, and the datasets' lineage (source files,
shard versions, checkpoints, ensembles). Ids, counts and sizes only: no texts.

Paging is keyset paging on ``(due_at, id)`` (index ``ix_erasure_requests_due_at_id``,
or ``ix_erasure_requests_state_due_at`` under a state filter): a page costs one
index range scan however deep it is, unlike OFFSET, which reads every row it skips.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, func, literal, select, tuple_
from sqlalchemy.orm import Session

from db.models import Dataset, ShardVersion, SourceFile, UTCDateTime
from db.requests import ErasureRequest
from db.training import Checkpoint, EnsembleMemberRow, EnsembleVersionRow, RequestMatch

DUE_FILTERS = ("any", "overdue", "week")  # "week": not overdue, due within 7 days
SOON = timedelta(days=7)
COUNT_CAP = 10_000  # the table says "10,000+" beyond this


@dataclass(frozen=True)
class RequestRow:
    id: str
    state: str
    received_at: datetime
    due_at: datetime
    datasets: tuple[str, ...] | None  # None: every dataset
    matches_by_method: dict[str, int]


@dataclass(frozen=True)
class RequestPage:
    rows: tuple[RequestRow, ...]
    total: int  # rows matching the filters, all pages (at most COUNT_CAP)
    next_cursor: str | None  # pass as ``after`` for the next page; None on the last
    more_than_total: bool = False  # True when more than COUNT_CAP rows match


def encode_cursor(due_at: datetime, request_id: str) -> str:
    return f"{due_at.astimezone(timezone.utc).isoformat()}|{request_id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``ValueError`` for a cursor this module did not write."""
    due, _, request_id = cursor.partition("|")
    moment = datetime.fromisoformat(due)
    if moment.tzinfo is None or not request_id or len(request_id) > 36:
        raise ValueError("not a page cursor")
    return moment, request_id


def request_page(session: Session, *, states: Iterable[str] | None, due: str = "any", after: str | None = None,
                 limit: int = 50, now: datetime | None = None) -> RequestPage:
    """Requests in ``states`` (None: all), earliest deadline first, ``limit`` per page,
    starting after the cursor ``after``; ``due`` narrows to overdue or due-within-7-days
    (open or not: pass the open states to see only what still needs work)."""
    if due not in DUE_FILTERS:
        raise ValueError(f"due is one of {', '.join(DUE_FILTERS)}")
    if not 1 <= limit <= 500:
        raise ValueError("limit is 1 to 500")
    now = now or datetime.now(timezone.utc)
    where = []
    if states is not None:
        where.append(ErasureRequest.state.in_(sorted(set(states))))
    if due == "overdue":
        where.append(ErasureRequest.due_at < now)
    elif due == "week":
        where += [ErasureRequest.due_at >= now, ErasureRequest.due_at < now + SOON]
    # counting every row of a large table costs more than the page itself: count up to a cap
    capped = select(ErasureRequest.id).where(*where).limit(COUNT_CAP + 1).subquery()
    total = session.scalar(select(func.count()).select_from(capped)) or 0
    if after:
        due_at, last_id = decode_cursor(after)
        # a row-value comparison: both PostgreSQL and SQLite seek the (due_at, id) index with it (an OR does not)
        where.append(tuple_(ErasureRequest.due_at, ErasureRequest.id) > tuple_(literal(due_at, UTCDateTime()),
                                                                             literal(last_id)))
    found = session.execute(
        select(ErasureRequest.id, ErasureRequest.state, ErasureRequest.received_at, ErasureRequest.due_at,
               ErasureRequest.datasets)
        .where(*where).order_by(ErasureRequest.due_at, ErasureRequest.id).limit(limit + 1)
    ).all()
    more = len(found) > limit
    found = found[:limit]
    counts = method_counts(session, [r.id for r in found])
    rows = tuple(RequestRow(r.id, r.state, r.received_at, r.due_at,
                            tuple(json.loads(r.datasets)) if r.datasets else None, counts.get(r.id, {}))
                 for r in found)
    cursor = encode_cursor(found[-1].due_at, found[-1].id) if more else None
    return RequestPage(rows, min(total, COUNT_CAP), cursor, total > COUNT_CAP)


def method_counts(session: Session, request_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """request id -> {method: matches recorded} (index ``ix_request_matches_request_id``)."""
    if not request_ids:
        return {}
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for request_id, method, n in session.execute(
        select(RequestMatch.request_id, RequestMatch.method, func.count())
        .where(RequestMatch.request_id.in_(list(request_ids)))
        .group_by(RequestMatch.request_id, RequestMatch.method)
    ).all():
        out[request_id][method] = n
    return dict(out)


# ---------------------------------------------------------------- datasets


@dataclass(frozen=True)
class ShardVersionInfo:
    shard: int
    version: int
    row_count: int
    sha256: str
    created_by: str
    created_at: datetime
    files_purged: bool
    checkpoints: int  # checkpoints trained on this version


@dataclass(frozen=True)
class EnsembleInfo:
    version_id: str
    parent_version_id: str | None
    created_by: str
    created_at: datetime
    members: dict[int, str]  # shard -> checkpoint key
    member_versions: dict[int, int]  # shard -> the shard version its checkpoint was trained on


@dataclass(frozen=True)
class SourceFileInfo:
    id: int
    name: str  # the file's base name (the full path stays on the server)
    sha256: str
    row_count: int
    new_record_count: int
    ingested_at: datetime


@dataclass(frozen=True)
class DatasetLineage:
    name: str
    n_shards: int
    n_slices: int
    embedder: str
    placement: str
    source_files: tuple[SourceFileInfo, ...]
    shard_versions: tuple[ShardVersionInfo, ...]  # by shard, then version
    ensembles: tuple[EnsembleInfo, ...]  # oldest first; the last is in service

    @property
    def current_ensemble(self) -> EnsembleInfo | None:
        return self.ensembles[-1] if self.ensembles else None


def dataset_lineages(session: Session, ensembles_per_dataset: int = 8) -> list[DatasetLineage]:
    """Every dataset with its source files, shard versions (and how many checkpoints each
    trained), and its newest ``ensembles_per_dataset`` ensemble versions with their members."""
    out = []
    for dataset in session.scalars(select(Dataset).order_by(Dataset.name)):
        files = tuple(SourceFileInfo(f.id, f.path.replace("\\", "/").rsplit("/", 1)[-1], f.sha256, f.row_count,
                                     f.new_record_count, f.ingested_at)
                      for f in session.scalars(select(SourceFile).where(SourceFile.dataset_id == dataset.id)
                                               .order_by(SourceFile.id)))
        trained = dict(((shard, version), n) for shard, version, n in session.execute(
            select(Checkpoint.shard, Checkpoint.shard_version, func.count())
            .where(Checkpoint.dataset_id == dataset.id).group_by(Checkpoint.shard, Checkpoint.shard_version)).all())
        versions = tuple(
            ShardVersionInfo(v.shard, v.version, v.row_count, v.sha256, v.created_by, v.created_at,
                             v.files_purged_at is not None, trained.get((v.shard, v.version), 0))
            for v in session.scalars(select(ShardVersion).where(ShardVersion.dataset_id == dataset.id)
                                     .order_by(ShardVersion.shard, ShardVersion.version)))
        rows = list(session.scalars(select(EnsembleVersionRow).where(EnsembleVersionRow.dataset_id == dataset.id)
                                    .order_by(EnsembleVersionRow.id.desc()).limit(ensembles_per_dataset)))[::-1]
        members: dict[int, dict[int, tuple[str, int]]] = defaultdict(dict)
        if rows:
            for ensemble_id, shard, key, shard_version in session.execute(
                select(EnsembleMemberRow.ensemble_id, EnsembleMemberRow.shard, EnsembleMemberRow.checkpoint_key,
                       Checkpoint.shard_version)
                .join(Checkpoint, and_(Checkpoint.dataset_id == EnsembleMemberRow.dataset_id,
                                       Checkpoint.key == EnsembleMemberRow.checkpoint_key))
                .where(EnsembleMemberRow.ensemble_id.in_([r.id for r in rows]))
            ).all():
                members[ensemble_id][shard] = (key, shard_version)
        ensembles = tuple(
            EnsembleInfo(r.version_id, r.parent_version_id, r.created_by, r.created_at,
                         {s: k for s, (k, _) in sorted(members[r.id].items())},
                         {s: v for s, (_, v) in sorted(members[r.id].items())})
            for r in rows)
        out.append(DatasetLineage(dataset.name, dataset.n_shards, dataset.n_slices, dataset.embedder,
                                  dataset.placement, files, versions, ensembles))
    return out

"""Upstream actions: the ingested source files that still hold an erased subject's rows.

We cannot delete data upstream of us, but we must say where it is. For a request,
every source file (path, sha256) that supplied one of its erased records, with the
row numbers, comes from lineage (``records.source_file_id``, ``row_number``). The
action stays open (``erasure audit due``) until an operator marks it done
(``erasure audit upstream-done REQUEST_ID --source SHA256``): a row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import Base, Record, SourceFile, UTCDateTime
from db.training import RequestMatch


class UpstreamActionDone(Base):
    """An operator's mark: this source file no longer holds the request's rows upstream (migration 0008)."""

    __tablename__ = "upstream_actions_done"

    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="RESTRICT"), primary_key=True)
    source_file_id: Mapped[int] = mapped_column(ForeignKey("source_files.id", ondelete="RESTRICT"), primary_key=True)
    done_at: Mapped[datetime] = mapped_column(UTCDateTime())
    done_by: Mapped[str] = mapped_column(String(200))


@dataclass(frozen=True)
class UpstreamAction:
    request_id: str
    source_file_id: int
    path: str
    sha256: str
    rows: tuple[int, ...]  # row numbers in the source file (from 1), of the subject's erased records
    done_at: datetime | None
    done_by: str | None

    @property
    def open(self) -> bool:
        return self.done_at is None

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "source_file_id": self.source_file_id, "path": self.path,
                "sha256": self.sha256, "rows": list(self.rows), "row_count": len(self.rows), "open": self.open,
                "done_at": self.done_at.isoformat() if self.done_at else None, "done_by": self.done_by}


def upstream_actions(session: Session, request_ids: list[str] | None = None) -> list[UpstreamAction]:
    """Per request and source file: where the erased records came from (all requests by default)."""
    query = (select(RequestMatch.request_id, SourceFile.id, SourceFile.path, SourceFile.sha256, Record.row_number)
             .join(Record, (Record.dataset_id == RequestMatch.dataset_id) & (Record.record_id == RequestMatch.record_id))
             .join(SourceFile, SourceFile.id == Record.source_file_id)
             .where(RequestMatch.erased_in_shard_version.is_not(None)))
    if request_ids is not None:
        query = query.where(RequestMatch.request_id.in_([str(r) for r in request_ids]))
    grouped: dict[tuple[str, int], tuple[str, str, set[int]]] = {}
    for request_id, source_id, path, sha, row in session.execute(query):
        grouped.setdefault((request_id, source_id), (path, sha, set()))[2].add(int(row))
    done_query = select(UpstreamActionDone)
    if request_ids is not None:
        done_query = done_query.where(UpstreamActionDone.request_id.in_([str(r) for r in request_ids]))
    done = {(d.request_id, d.source_file_id): d for d in session.scalars(done_query)}
    out = []
    for (request_id, source_id), (path, sha, rows) in sorted(grouped.items()):
        mark = done.get((request_id, source_id))
        out.append(UpstreamAction(request_id, source_id, path, sha, tuple(sorted(rows)),
                                  mark.done_at if mark else None, mark.done_by if mark else None))
    return out


def open_upstream_actions(session: Session) -> list[UpstreamAction]:
    return [a for a in upstream_actions(session) if a.open]

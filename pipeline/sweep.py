"""What the scheduled sweep (``flows/sweep.py``) acts on, so that no request waits for an operator.

- A ``received`` request older than a grace period: its processing run was never started
  (Prefect was down at intake, the API process died before starting it, no deployment was
  configured) or ended before it began.
- A request in another open state (not ``failed``: that one needs an operator's reopening)
  whose state has not changed for ``stuck_after``: its run crashed, was cancelled, or ended
  waiting (a review decided through the API since, a retraining left to a schedule).

The flow skips those that have a live flow run. Only ids, states and dates leave here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from db.models import utcnow
from db.requests import ErasureRequest
from pipeline.lifecycle import OPEN_STATES, RequestState, overdue_requests, requests_due_within

# Open states a processing run moves on by itself; ``failed`` waits for an operator.
RESTARTABLE_STATES = frozenset(OPEN_STATES - {RequestState.RECEIVED, RequestState.FAILED})
DUE_SOON = timedelta(days=7)


@dataclass(frozen=True)
class WaitingRequest:
    request_id: str
    state: str
    due_at: datetime
    since: datetime  # the last change of state

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "state": self.state, "due_at": self.due_at.isoformat(),
                "since": self.since.isoformat()}


def _view(request: ErasureRequest) -> WaitingRequest:
    return WaitingRequest(request.id, request.state, request.due_at, request.updated_at)


def requests_to_start(session: Session, *, stuck_after: timedelta, received_grace: timedelta,
                      now: datetime | None = None) -> list[WaitingRequest]:
    """Requests that need a processing run, earliest deadline first."""
    if stuck_after < timedelta(0) or received_grace < timedelta(0):
        raise ValueError("the sweep's bounds must not be negative")
    now = now or utcnow()
    rows = session.scalars(
        select(ErasureRequest)
        .where(or_(
            and_(ErasureRequest.state == RequestState.RECEIVED, ErasureRequest.updated_at <= now - received_grace),
            and_(ErasureRequest.state.in_(sorted(RESTARTABLE_STATES)),
                 ErasureRequest.updated_at <= now - stuck_after),
        ))
        .order_by(ErasureRequest.due_at, ErasureRequest.id)
    )
    return [_view(r) for r in rows]


def requests_due_soon(session: Session, window: timedelta = DUE_SOON, now: datetime | None = None) -> list[WaitingRequest]:
    """Open requests overdue or due within ``window``, earliest deadline first."""
    now = now or utcnow()
    return [_view(r) for r in overdue_requests(session, now) + requests_due_within(session, window, now)]


def due_soon_table(requests: list[WaitingRequest], now: datetime | None = None) -> list[dict]:
    """Rows of the sweep's artifact: ids, states and due dates only."""
    now = now or utcnow()
    return [{"request_id": r.request_id, "state": r.state, "due_at": r.due_at.isoformat(),
             "days_left": round((r.due_at - now).total_seconds() / 86400, 1)} for r in requests]

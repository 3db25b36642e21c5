"""pipeline/sweep.py: which requests the scheduled sweep starts, and what it reports
(both backends; the Prefect side is in test_service_runs_itself.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from db.models import utcnow
from db.session import unit_of_work
from pipeline.database import open_database
from pipeline.lifecycle import get_request, submit_request
from pipeline.sweep import due_soon_table, requests_due_soon, requests_to_start


def test_the_sweep_starts_waiting_and_stuck_requests_only(settings) -> None:  # noqa: ANN001
    engine = open_database(settings)
    now = utcnow()
    ids = {}
    # name -> (state, last change, due in)
    layout = {"fresh": ("received", timedelta(seconds=5), timedelta(days=30)),
              "left": ("received", timedelta(minutes=10), timedelta(days=3)),
              "stuck": ("erasing", timedelta(hours=2), timedelta(days=20)),
              "busy": ("locating", timedelta(minutes=5), timedelta(days=6)),
              "failed": ("failed", timedelta(days=2), timedelta(days=1)),
              "done": ("completed", timedelta(days=2), timedelta(days=2)),
              "late": ("awaiting_review", timedelta(days=3), timedelta(days=-1))}
    try:
        for name, (state, age, due_in) in layout.items():
            ids[name] = submit_request(engine, settings.secret_key_bytes(), idempotency_key=name,
                                       identifiers=[("email", f"{name}@example.org")], samples=[],
                                       actor="test").request_id
            with unit_of_work(engine) as session:  # a state and its age as a run would have left them
                request = get_request(session, ids[name])
                request.state, request.updated_at, request.due_at = state, now - age, now + due_in
        with unit_of_work(engine) as session:
            chosen = requests_to_start(session, stuck_after=timedelta(hours=1), received_grace=timedelta(minutes=1),
                                       now=now)
            due = due_soon_table(requests_due_soon(session, now=now), now=now)
            with pytest.raises(ValueError):
                requests_to_start(session, stuck_after=timedelta(seconds=-1), received_grace=timedelta(0))
    finally:
        engine.dispose()
    # earliest deadline first; fresh (grace), busy (within the bound), failed and closed ones are not started
    assert [w.request_id for w in chosen] == [ids["late"], ids["left"], ids["stuck"]]
    assert [row["request_id"] for row in due] == [ids["late"], ids["failed"], ids["left"], ids["busy"]]
    assert set(due[0]) == {"request_id", "state", "due_at", "days_left"}  # ids, states and dates only
    assert due[0]["days_left"] == -1.0 and due[0]["state"] == "awaiting_review"

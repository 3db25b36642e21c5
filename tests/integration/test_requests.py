"""Erasure requests on both backends: intake, idempotency, the state machine,
deadlines and extensions, denial, overdue detection, review decisions, tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, func, select

from db.requests import (
    ApiToken,
    ErasureRequest,
    RequestEvent,
    RequestIdentifier,
    RequestNote,
    RequestSample,
    find_active_token,
    issue_token,
    revoke_token,
)
from db.session import unit_of_work
from db.settings import Settings
from dedup.identifiers import keyed_hash
from pipeline.database import open_database
from pipeline.lifecycle import (
    ALLOWED_TRANSITIONS,
    CLOSED_STATES,
    IdempotencyConflict,
    IllegalTransition,
    InvalidRequest,
    RequestConflict,
    RequestNotFound,
    RequestState,
    ReviewInput,
    add_calendar_months,
    deny_request,
    describe_request,
    extend_deadline,
    identifier_hashes,
    overdue_requests,
    purge_samples,
    record_review_decisions,
    requests_due_within,
    review_verdicts,
    sample_texts,
    submit_request,
    transition,
)
from tests.conftest import database_dump

UTC = timezone.utc
JANE = [("email", "Jane.Doe@Example.ORG "), ("name", "Jane  Doe"), ("phone", "+44 20 7946 0958")]
SAMPLE = "I wrote this review of the blue kettle, which leaked on day two"

NOTE_KEY = b"test-note-key-0123456789abcdef"  # keys the notes' hashes on the audit log


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = open_database(settings)
    yield engine
    engine.dispose()


def submit(engine: Engine, settings: Settings, key: str = "key-1", identifiers=JANE, samples=(SAMPLE,), now=None):
    return submit_request(engine, settings.secret_key_bytes(), idempotency_key=key, identifiers=identifiers,
                          samples=samples, actor="test", now=now)


def count(engine: Engine, model: type) -> int:
    with unit_of_work(engine) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


# ---------------------------------------------------------------- deadlines (no database)


@pytest.mark.parametrize(
    ("received", "months", "due"),
    [
        ("2025-01-31T09:15", 1, "2025-02-28T09:15"),  # clipped to a short February
        ("2024-01-31T09:15", 1, "2024-02-29T09:15"),  # leap year
        ("2025-03-31T00:00", 1, "2025-04-30T00:00"),
        ("2025-08-31T23:59", 1, "2025-09-30T23:59"),
        ("2025-12-31T12:00", 1, "2026-01-31T12:00"),  # over the year end
        ("2025-02-28T08:00", 1, "2025-03-28T08:00"),  # not "end of month to end of month"
        ("2025-01-31T09:15", 3, "2025-04-30T09:15"),  # a two-month extension, from receipt
        ("2025-11-30T10:00", 3, "2026-02-28T10:00"),
        ("2025-05-15T10:00", 2, "2025-07-15T10:00"),
    ],
)
def test_calendar_month_arithmetic(received: str, months: int, due: str) -> None:
    start = datetime.fromisoformat(received).replace(tzinfo=UTC)
    assert add_calendar_months(start, months) == datetime.fromisoformat(due).replace(tzinfo=UTC)


def test_the_state_machine_table_is_closed_and_complete() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(RequestState)
    for state, targets in ALLOWED_TRANSITIONS.items():
        assert all(isinstance(why, str) and why for why in targets.values())  # every transition documented
        if state in CLOSED_STATES:
            assert targets == {}
        elif state is not RequestState.FAILED:
            assert RequestState.FAILED in targets
    reachable, frontier = {RequestState.RECEIVED}, [RequestState.RECEIVED]
    while frontier:
        for target in ALLOWED_TRANSITIONS[frontier.pop()]:
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(RequestState)


# ---------------------------------------------------------------- intake


def test_submit_keeps_keyed_hashes_and_sets_the_deadline(settings: Settings, engine: Engine) -> None:
    received = datetime(2024, 1, 31, 23, 30, tzinfo=timezone(timedelta(hours=1)))  # 22:30 UTC
    submission = submit(engine, settings, now=received)
    assert submission.received_at == datetime(2024, 1, 31, 22, 30, tzinfo=UTC)
    assert submission.due_at == datetime(2024, 2, 29, 22, 30, tzinfo=UTC)
    assert not submission.replayed

    with unit_of_work(engine) as session:
        status = describe_request(session, submission.request_id, now=received)
        assert status.state == "received" and status.due_at == status.original_due_at == submission.due_at
        assert status.due_at.tzinfo is not None and status.due_at.utcoffset() == timedelta(0)
        assert status.identifier_kinds == {"email": 1, "name": 1, "phone": 1} and status.sample_count == 1
        assert [(e.action, e.from_state, e.to_state) for e in status.history] == [("submitted", None, "received")]
        key = settings.secret_key_bytes()
        # the same keyed hashes ingest stores for records, so locating can join them
        assert sorted(identifier_hashes(session, submission.request_id)) == sorted(
            (kind, keyed_hash(key, kind, value)) for kind, value in JANE
        )
        assert sample_texts(session, submission.request_id) == [SAMPLE]

    dump = database_dump(settings.resolved_database_url).casefold()
    assert submission.request_id in dump
    for raw in ("jane.doe@example.org", "jane doe", "jane  doe", "7946"):
        assert raw not in dump

    with pytest.raises(InvalidRequest) as info:
        submit(engine, settings, key="bad", identifiers=[("email", "no-at-sign")])
    assert info.value.field == "identifiers.0.value"
    with pytest.raises(InvalidRequest, match="at least one identifier or one sample"):
        submit(engine, settings, key="empty", identifiers=[], samples=[])
    with pytest.raises(InvalidRequest, match="at most 20000 characters"):
        submit(engine, settings, key="long", samples=["x" * 20_001])
    with pytest.raises(InvalidRequest, match="idempotency key"):
        submit(engine, settings, key="has space")
    assert count(engine, ErasureRequest) == 1


def test_idempotency_key_same_body_same_request_other_body_conflict(settings: Settings, engine: Engine) -> None:
    first = submit(engine, settings, key="k-42")
    # the same content spelled and ordered differently is the same body
    again = submit(engine, settings, key="k-42", identifiers=list(reversed([("email", "jane.doe@example.org"),
                                                                           ("name", "jane doe"),
                                                                           ("phone", "0044 20 7946 0958")])))
    assert again.request_id == first.request_id and again.replayed
    assert (again.received_at, again.due_at) == (first.received_at, first.due_at)
    with pytest.raises(IdempotencyConflict, match="different body"):
        submit(engine, settings, key="k-42", samples=("another text",))
    other = submit(engine, settings, key="k-43")
    assert other.request_id != first.request_id
    assert count(engine, ErasureRequest) == 2 and count(engine, RequestSample) == 2


def test_concurrent_submissions_of_one_key_create_one_request(settings: Settings, engine: Engine) -> None:
    barrier = threading.Barrier(8)
    ids: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            ids.append(submit(engine, settings, key="same-key").request_id)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(ids) == 8 and len(set(ids)) == 1
    assert count(engine, ErasureRequest) == 1 and count(engine, RequestIdentifier) == 3


# ---------------------------------------------------------------- the state machine


def test_lifecycle_records_every_step_and_purges_samples(settings: Settings, engine: Engine) -> None:
    request_id = submit(engine, settings).request_id
    with unit_of_work(engine) as session:
        transition(session, request_id, "locating", actor="flow")
        transition(session, request_id, RequestState.AWAITING_REVIEW, key=NOTE_KEY, actor="flow", reason="2 borderline matches")
        record_review_decisions(session, request_id, [ReviewInput("rec-1", "erase"), ReviewInput("rec-2", "keep")],
                                key=NOTE_KEY, reviewer="token:dpo")
        status = record_review_decisions(session, request_id, [ReviewInput("rec-2", "erase", "on second look")],
                                         key=NOTE_KEY, reviewer="token:dpo2")
        assert {(d.match_ref, d.decision, d.reviewer) for d in status.review_decisions} == {
            ("rec-1", "erase", "token:dpo"), ("rec-2", "erase", "token:dpo2")}
        assert review_verdicts(session, request_id) == {"rec-1": "erase", "rec-2": "erase"}
        for state in ("erasing", "awaiting_retrain", "retraining", "verifying"):
            transition(session, request_id, state, actor="flow")
        with pytest.raises(RequestConflict, match="review decisions are taken while"):
            record_review_decisions(session, request_id, [ReviewInput("rec-3", "keep")], key=NOTE_KEY, reviewer="x")
        assert sample_texts(session, request_id) == [SAMPLE]
        transition(session, request_id, "completed", actor="flow")

    with unit_of_work(engine) as session:
        status = describe_request(session, request_id)
        assert status.state == "completed" and status.closed_at is not None
        assert status.samples_purged_at is not None and status.sample_count == 1
        assert sample_texts(session, request_id) == []
        moves = [(e.from_state, e.to_state) for e in status.history if e.action == "transition"]
        assert moves == [("received", "locating"), ("locating", "awaiting_review"), ("awaiting_review", "erasing"),
                         ("erasing", "awaiting_retrain"), ("awaiting_retrain", "retraining"),
                         ("retraining", "verifying"), ("verifying", "completed")]
        assert [e.action for e in status.history].count("review") == 2
        assert status.history[-1].action == "samples_purged" and status.history[-1].reason == "1 sample(s) deleted"
        assert all(e.at.tzinfo is not None for e in status.history)
        with pytest.raises(IllegalTransition, match="cannot go from completed to failed"):
            transition(session, request_id, "failed", key=NOTE_KEY, actor="x", reason="late")
        assert purge_samples(session, request_id) == 0  # already purged: nothing, no new event
    assert count(engine, RequestSample) == 0
    assert SAMPLE.casefold() not in database_dump(settings.resolved_database_url).casefold()


def test_illegal_and_incomplete_transitions_are_refused(settings: Settings, engine: Engine) -> None:
    request_id = submit(engine, settings).request_id
    with unit_of_work(engine) as session:
        with pytest.raises(IllegalTransition, match=r"cannot go from received to erasing \(allowed from received: "
                                                     r"locating, denied, failed\)"):
            transition(session, request_id, "erasing", actor="x")
        with pytest.raises(InvalidRequest, match="unknown state 'done'"):
            transition(session, request_id, "done", actor="x")
        with pytest.raises(InvalidRequest, match="use deny_request"):
            transition(session, request_id, "denied", actor="x")
        with pytest.raises(InvalidRequest, match="needs a reason"):
            transition(session, request_id, "failed", key=NOTE_KEY, actor="x", reason="  ")
        with pytest.raises(RequestNotFound):
            transition(session, "00000000-0000-0000-0000-000000000000", "locating", actor="x")
        transition(session, request_id, "failed", key=NOTE_KEY, actor="flow", reason="shard store unreachable")
        transition(session, request_id, "received", key=NOTE_KEY, actor="ops", reason="store is back; retry")
        status = describe_request(session, request_id)
    assert status.state == "received" and status.closed_at is None
    # an operator's reason is a request note; the timeline points at it
    assert [(e.to_state, e.reason.split(";")[0]) for e in status.history][1:] == [
        ("failed", "operator"), ("received", "operator")]
    with unit_of_work(engine) as session:
        assert [e.to_state for e in session.scalars(select(RequestEvent))].count("failed") == 1
        notes = {n.id: (n.kind, n.text) for n in session.scalars(select(RequestNote))}
    assert sorted(notes.values()) == [("transition_reason", "shard store unreachable"),
                                      ("transition_reason", "store is back; retry")]
    assert [e.reason for e in status.history][1:] == [f"operator; reason in note {i}" for i in sorted(notes)]


# ---------------------------------------------------------------- extension, denial, overdue


def test_extension_needs_a_reason_and_stays_within_two_months(settings: Settings, engine: Engine) -> None:
    received = datetime(2025, 1, 31, 10, 0, tzinfo=UTC)
    request_id = submit(engine, settings, now=received).request_id
    during_first_month = received + timedelta(days=20)
    with unit_of_work(engine) as session:
        with pytest.raises(InvalidRequest) as info:
            extend_deadline(session, request_id, months=1, reason=" ", key=NOTE_KEY, actor="dpo", now=during_first_month)
        assert info.value.field == "reason"
        with pytest.raises(InvalidRequest) as info:
            extend_deadline(session, request_id, months=3, reason="complex", key=NOTE_KEY, actor="dpo", now=during_first_month)
        assert info.value.field == "months"
        status = extend_deadline(session, request_id, months=1, reason="records in 40 datasets", key=NOTE_KEY, actor="dpo",
                                 now=during_first_month)
        assert status.due_at == datetime(2025, 3, 31, 10, 0, tzinfo=UTC)  # from receipt, not from 28 Feb
        assert status.original_due_at == datetime(2025, 2, 28, 10, 0, tzinfo=UTC)
        status = extend_deadline(session, request_id, months=1, reason="retraining queue", key=NOTE_KEY, actor="dpo",
                                 now=during_first_month + timedelta(days=1))
        assert (status.extension_months, status.due_at) == (2, datetime(2025, 4, 30, 10, 0, tzinfo=UTC))
        assert status.extension_reason == "retraining queue"
        with pytest.raises(RequestConflict, match="at most 2 further months"):
            extend_deadline(session, request_id, months=1, reason="more", key=NOTE_KEY, actor="dpo", now=during_first_month)
        events = [e for e in status.history if e.action == "extended"]
        assert [e.reason.split(";")[0] for e in events] == [
            "+1 month(s), due 2025-03-31T10:00:00+00:00",
            "+1 month(s), due 2025-04-30T10:00:00+00:00",
        ]
        assert all("reason in note" in e.reason and "queue" not in e.reason for e in events)

    late_id = submit(engine, settings, key="late", now=received).request_id
    with unit_of_work(engine) as session, pytest.raises(RequestConflict, match="within it"):
        extend_deadline(session, late_id, months=1, reason="too late", key=NOTE_KEY, actor="dpo", now=received + timedelta(days=29))

    closed_id = submit(engine, settings, key="closed").request_id
    with unit_of_work(engine) as session:
        transition(session, closed_id, "locating", actor="flow")
        transition(session, closed_id, "completed", actor="flow")
        with pytest.raises(RequestConflict, match="closed request cannot be extended"):
            extend_deadline(session, closed_id, months=1, reason="x", key=NOTE_KEY, actor="dpo")


def test_denial_needs_an_art17_3_ground_and_closes_the_request(settings: Settings, engine: Engine) -> None:
    request_id = submit(engine, settings).request_id
    with unit_of_work(engine) as session:
        with pytest.raises(InvalidRequest, match="unknown Art. 17\\(3\\) ground 'too_expensive'") as info:
            deny_request(session, request_id, ground="too_expensive", detail="x", key=NOTE_KEY, actor="dpo")
        assert info.value.field == "ground"
        with pytest.raises(InvalidRequest) as info:
            deny_request(session, request_id, ground="legal_claims", detail="", key=NOTE_KEY, actor="dpo")
        assert info.value.field == "detail"
        status = deny_request(session, request_id, ground="legal_claims", detail="litigation hold, case 2025/114",
                              key=NOTE_KEY, actor="token:dpo")
    assert (status.state, status.denial_ground, status.denial_detail) == (
        "denied", "legal_claims", "litigation hold, case 2025/114")
    assert status.closed_at is not None and status.samples_purged_at is not None and not status.overdue
    assert [e.action for e in status.history][-2:] == ["denied", "samples_purged"]
    assert status.history[-2].reason.startswith("Art. 17(3) legal_claims; reasoning in note ")
    assert count(engine, RequestSample) == 0

    with unit_of_work(engine) as session:
        with pytest.raises(IllegalTransition, match="cannot go from denied to denied"):
            deny_request(session, request_id, ground="legal_claims", detail="again", key=NOTE_KEY, actor="dpo")
    erasing_id = submit(engine, settings, key="erasing").request_id
    with unit_of_work(engine) as session:
        for state in ("locating", "erasing"):
            transition(session, erasing_id, state, actor="flow")
        with pytest.raises(IllegalTransition, match="cannot go from erasing to denied"):
            deny_request(session, erasing_id, ground="public_health", detail="too late to deny", key=NOTE_KEY, actor="dpo")


def test_overdue_and_due_soon_detection(settings: Settings, engine: Engine) -> None:
    now = datetime(2025, 6, 20, 12, 0, tzinfo=UTC)
    long_ago, recent = now - timedelta(days=40), now - timedelta(days=25)

    def make(key: str, received: datetime) -> str:
        return submit(engine, settings, key=key, now=received).request_id

    overdue, extended, closed, failed = (make(k, long_ago) for k in ("overdue", "extended", "closed", "failed"))
    due_soon, fresh = make("due-soon", recent), make("fresh", now - timedelta(days=1))
    with unit_of_work(engine) as session:
        extend_deadline(session, extended, months=1, reason="complex", key=NOTE_KEY, actor="dpo", now=long_ago + timedelta(days=3))
        transition(session, closed, "locating", actor="flow", now=long_ago + timedelta(days=50))
        transition(session, closed, "completed", actor="flow", now=long_ago + timedelta(days=50))
        transition(session, failed, "failed", key=NOTE_KEY, actor="flow", reason="crashed", now=long_ago + timedelta(days=2))

    with unit_of_work(engine) as session:
        assert sorted(r.id for r in overdue_requests(session, now=now)) == sorted([overdue, failed])
        assert [r.id for r in requests_due_within(session, timedelta(days=7), now=now)] == [due_soon]
        assert {r.id for r in requests_due_within(session, timedelta(days=40), now=now)} == {due_soon, fresh, extended}
        assert describe_request(session, overdue, now=now).overdue
        assert not describe_request(session, extended, now=now).overdue
        assert not describe_request(session, closed, now=now).overdue  # closed late, but closed
        assert overdue_requests(session, now=long_ago) == []


# ---------------------------------------------------------------- tokens


def test_tokens_are_stored_hashed_scoped_and_revocable(settings: Settings, engine: Engine) -> None:
    with unit_of_work(engine) as session:
        token, row = issue_token(session, "portal", ["intake"])
        admin_token, _ = issue_token(session, "ops", ["admin"])
        with pytest.raises(ValueError, match="unknown scope"):
            issue_token(session, "bad", ["intake", "superuser"])
        with pytest.raises(ValueError, match="give at least one scope"):
            issue_token(session, "none", [])
        with pytest.raises(ValueError, match="exists"):
            issue_token(session, "portal", ["review"])
    assert token.startswith("er_") and len(token) > 40
    assert token not in database_dump(settings.resolved_database_url)
    with unit_of_work(engine) as session:
        found = find_active_token(session, token)
        assert found is not None and found.allows("intake") and not found.allows("review")
        admin = find_active_token(session, admin_token)
        assert admin is not None and all(admin.allows(s) for s in ("intake", "review", "audit", "screen"))
        assert find_active_token(session, token + "x") is None
        revoke_token(session, "portal")
    with unit_of_work(engine) as session:
        assert find_active_token(session, token) is None
        with pytest.raises(LookupError, match="no token named"):
            revoke_token(session, "nobody")
    assert count(engine, ApiToken) == 2

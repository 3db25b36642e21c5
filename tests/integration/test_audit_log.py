"""The hash-chained audit log on both backends: every state change is logged,
the table rejects UPDATE and DELETE, a superuser's edit is still found by
``verify-log``, and concurrent appends keep one unbroken chain."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from api.cli import app
from db.audit import GENESIS_HASH, AuditEvent, append_event, verify_chain
from db.requests import issue_token, revoke_token
from db.session import unit_of_work
from db.settings import Settings
from pipeline.database import open_database
from pipeline.lifecycle import RequestState, deny_request, extend_deadline, submit_request, transition

JANE = [("email", "jane.doe@example.org"), ("name", "Jane Doe")]
SAMPLE = "my review of the blue kettle that leaked on day two"

NOTE_KEY = b"test-note-key-0123456789abcdef"  # keys the notes' hashes on the audit log


@pytest.fixture(autouse=True)
def _test_event_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kind for these tests only: every kind needs its details schema."""
    from db.audit import EVENT_SCHEMAS, INT

    monkeypatch.setitem(EVENT_SCHEMAS, "test.event", ({"n": INT, "worker": INT, "i": INT},
                                                      frozenset({"n", "worker", "i"})))


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = open_database(settings)
    yield engine
    engine.dispose()


def _lifecycle(engine: Engine, settings: Settings) -> str:
    key = settings.secret_key_bytes()
    first = submit_request(engine, key, idempotency_key="k-1", identifiers=JANE, samples=[SAMPLE], actor="portal")
    second = submit_request(engine, key, idempotency_key="k-2", identifiers=[("user_id", "u-77")], samples=[],
                            actor="portal")
    with unit_of_work(engine) as session:
        transition(session, first.request_id, RequestState.LOCATING, actor="flow")
        extend_deadline(session, first.request_id, months=1, reason="complex: 40 shards", key=NOTE_KEY, actor="dpo")
        deny_request(session, second.request_id, ground="legal_claims", detail="litigation hold", key=NOTE_KEY, actor="dpo")
        issue_token(session, "portal", ["intake"])
        revoke_token(session, "portal")
    return first.request_id


def _events(engine: Engine) -> list[AuditEvent]:
    with unit_of_work(engine) as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_every_change_is_chained_and_verifies(engine: Engine, settings: Settings) -> None:
    request_id = _lifecycle(engine, settings)
    events = _events(engine)
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["request.submitted", "request.submitted"]
    for kind in ("request.transition", "request.extended", "request.denied", "request.samples_purged",
                 "token.created", "token.revoked"):
        assert kind in kinds, kind
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:]))
    timeline = [e for e in events if e.request_id == request_id]
    assert [json.loads(e.details)["to_state"] for e in timeline] == ["received", "locating", "locating"]
    # nothing the subject sent is in the log: only hashes, states and reasons
    dump = " ".join(e.details + e.actor for e in events).lower()
    assert "jane" not in dump and "kettle" not in dump and "u-77" not in dump
    with unit_of_work(engine) as session:
        verdict = verify_chain(session, batch=3)  # several batches
    assert verdict.ok and verdict.events == len(events) and verdict.last_hash == events[-1].hash


@pytest.mark.parametrize("statement", ["UPDATE audit_events SET actor = 'someone else' WHERE id = 1",
                                       "DELETE FROM audit_events WHERE id = 1"])
def test_the_table_rejects_update_and_delete(engine: Engine, settings: Settings, statement: str) -> None:
    _lifecycle(engine, settings)
    with pytest.raises(DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.execute(text(statement))
    with unit_of_work(engine) as session:
        assert verify_chain(session).ok


def _bypass_trigger_and_run(engine: Engine, statement: str) -> None:
    """What a superuser could do: switch the trigger off, then edit."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))
        conn.execute(text(statement))


@pytest.mark.parametrize(("statement", "broken", "says"), [
    ("UPDATE audit_events SET details = replace(details, 'legal_claims', 'consent') WHERE kind = 'request.denied'",
     "denied", "changed after it was written"),
    ("UPDATE audit_events SET actor = 'nobody' WHERE id = 3", 3, "changed after it was written"),
    ("DELETE FROM audit_events WHERE id = 4", 5, "missing"),
])
def test_verify_log_names_the_first_tampered_event(
    engine: Engine, settings: Settings, statement: str, broken: object, says: str
) -> None:
    _lifecycle(engine, settings)
    if broken == "denied":
        broken = next(e.id for e in _events(engine) if e.kind == "request.denied")
    _bypass_trigger_and_run(engine, statement)
    with unit_of_work(engine) as session:
        verdict = verify_chain(session)
    assert not verdict.ok
    assert verdict.first_broken_id == broken
    assert says in verdict.problem

    runner = CliRunner()
    result = runner.invoke(app, ["audit", "verify-log", "--json", "--database-url", settings.database_url,
                                 "--home", str(settings.home)])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["first_broken_id"] == broken


def test_verify_log_cli_on_an_intact_log(engine: Engine, settings: Settings) -> None:
    _lifecycle(engine, settings)
    result = CliRunner().invoke(app, ["audit", "verify-log", "--database-url", settings.database_url,
                                      "--home", str(settings.home)])
    assert result.exit_code == 0, result.output
    assert "audit log intact" in result.stdout


def test_a_rolled_back_transaction_leaves_no_event(engine: Engine) -> None:
    with pytest.raises(RuntimeError):
        with unit_of_work(engine) as session:
            append_event(session, "test.event", {"n": 1}, actor="test")
            raise RuntimeError("the business change failed")
    assert _events(engine) == []
    with unit_of_work(engine) as session:
        append_event(session, "test.event", {"n": 2}, actor="test")
        assert verify_chain(session).ok


@pytest.mark.postgres
def test_concurrent_appends_keep_one_chain(postgres_url: str, tmp_path) -> None:  # noqa: ANN001
    settings = Settings(home=tmp_path / "home", database_url=postgres_url, secret_key="x" * 32)
    engine = open_database(settings)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                with unit_of_work(engine) as session:
                    append_event(session, "test.event", {"worker": n, "i": i}, actor=f"worker-{n}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with unit_of_work(engine) as session:
            assert session.scalar(select(func.count()).select_from(AuditEvent)) == 80
            verdict = verify_chain(session)
        assert verdict.ok and verdict.events == 80
    finally:
        engine.dispose()


def test_an_event_time_in_another_zone_still_verifies(engine: Engine) -> None:
    from datetime import datetime, timedelta, timezone

    berlin = timezone(timedelta(hours=1))
    with unit_of_work(engine) as session:
        append_event(session, "test.event", {"n": 1}, actor="test", at=datetime(2026, 11, 29, 4, 0, 0, 123456, berlin))
        append_event(session, "test.event", {"n": 2}, actor="test")
    with unit_of_work(engine) as session:
        assert verify_chain(session).ok

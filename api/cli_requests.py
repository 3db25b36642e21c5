"""The ``erasure request ...``, ``erasure token ...`` and ``erasure serve``
commands. Thin, like ``api/cli.py``: parse flags, call one service, print.
With ``--json`` each prints one JSON document on stdout (the same shapes as
the API's answers); bad input exits with status 2 and a message on stderr.

``register_commands(app)`` mounts them on the main ``erasure`` app.
"""

from __future__ import annotations

import getpass
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from sqlalchemy import Engine

from api.cli_common import IDENTIFIER_HELP, DbOpt, HomeOpt, JsonOpt, parse_identifiers
from api.cli_common import emit as _emit
from api.cli_common import fail as _fail
from api.cli_common import settings_from_flags as _settings
from db.settings import Settings

request_app = typer.Typer(no_args_is_help=True,
                          help="Erasure requests: submit, show, review, extend, deny, purge-notes.")
token_app = typer.Typer(no_args_is_help=True, help="API bearer tokens (stored only as SHA-256).")

ActorOpt = Annotated[Optional[str], typer.Option(
    "--actor", help="Who acts, for the timeline: a principal without spaces (default cli:$USER).")]
RequestId = Annotated[str, typer.Argument(help="The request id (a UUID).")]


def register_commands(app: typer.Typer) -> None:
    """Mount ``request``, ``token`` and ``serve`` on the ``erasure`` app."""
    app.add_typer(request_app, name="request")
    app.add_typer(token_app, name="token")
    app.command("serve")(serve)


# ---------------------------------------------------------------- helpers




def _actor(actor: str | None) -> str:
    return actor or f"cli:{getpass.getuser()}"


@contextmanager
def _database(home: Path | None, database_url: str | None) -> Iterator[tuple[Settings, Engine]]:
    """Settings and an engine over the upgraded schema; service errors exit 2."""
    from pipeline.database import open_database
    from pipeline.lifecycle import InvalidRequest, RequestError

    settings = _settings(home, database_url)
    engine = open_database(settings)
    try:
        yield settings, engine
    except InvalidRequest as exc:
        _fail(f"{exc.field}: {exc}" if exc.field else str(exc))
    except (RequestError, LookupError, ValueError) as exc:
        _fail(str(exc))
    finally:
        engine.dispose()


def _status_json(status: object) -> dict:
    from api.schemas import RequestStatusOut

    return RequestStatusOut.model_validate(status).model_dump(mode="json")


def _status_line(data: dict) -> str:
    line = f"request {data['id']}: {data['state']}, due {data['due_at']}"
    if data["overdue"]:
        line += " (OVERDUE)"
    if data["extension_months"]:
        line += f", extended by {data['extension_months']} month(s)"
    if data["denial_ground"]:
        line += f", denied under Art. 17(3) {data['denial_ground']}"
    return line


def _read_body(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The API's submission body from a JSON file ('-' for stdin)."""
    from api.schemas import SubmitRequestIn

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"--body {path}: cannot read it: {exc}")
    try:
        body = SubmitRequestIn.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        _fail(f"--body {path}: {problems}")
    return body.identifier_pairs(), list(body.samples)


# ---------------------------------------------------------------- requests


@request_app.command("submit")
def submit(
    identifier: Annotated[
        list[str], typer.Option("--identifier", "-i", help=IDENTIFIER_HELP)
    ] = [],  # noqa: B006 - typer needs a literal default
    sample: Annotated[list[str], typer.Option("--sample", help="A content sample text. Repeatable.")] = [],  # noqa: B006
    sample_file: Annotated[
        list[Path], typer.Option("--sample-file", help="A UTF-8 file holding one sample. Repeatable.")
    ] = [],  # noqa: B006
    body: Annotated[
        Optional[Path], typer.Option("--body", help="A JSON file with the API's body {identifiers, samples}; '-' = stdin.")
    ] = None,
    idempotency_key: Annotated[
        Optional[str], typer.Option("--idempotency-key", help="Resubmitting with the same key is a no-op (default: new UUID).")
    ] = None,
    dataset: Annotated[
        list[str], typer.Option("--dataset", help="A dataset the request covers. Repeatable (default: every dataset).")
    ] = [],  # noqa: B006 - typer needs a literal default
    actor: ActorOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit an erasure request (identifiers are stored only as keyed hashes)."""
    from pipeline.lifecycle import submit_request

    identifiers = parse_identifiers(identifier)
    samples = list(sample)
    for path in sample_file:
        try:
            samples.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"--sample-file {path}: cannot read it: {exc}")
    if body is not None:
        more_identifiers, more_samples = _read_body(body)
        identifiers += more_identifiers
        samples += more_samples
    key = idempotency_key or str(uuid.uuid4())
    with _database(home, database_url) as (settings, engine):
        submission = submit_request(engine, settings.secret_key_bytes(), idempotency_key=key,
                                    identifiers=identifiers, samples=samples, actor=_actor(actor),
                                    datasets=list(dataset) or None)
    from api.routes.requests import PREFIX
    from api.schemas import SubmissionOut

    data = SubmissionOut.of(submission, f"{PREFIX}/{submission.request_id}").model_dump(mode="json")
    data.update(idempotency_key=key, replayed=submission.replayed)
    verb = "already submitted" if submission.replayed else "received"
    _emit(data, as_json, f"request {submission.request_id} {verb}; due {data['due_at']}")


@request_app.command("show")
def show(request_id: RequestId, home: HomeOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """A request's state, deadline, decisions and timeline."""
    from db.session import unit_of_work
    from pipeline.lifecycle import describe_request

    with _database(home, database_url) as (_, engine), unit_of_work(engine) as session:
        data = _status_json(describe_request(session, request_id))
    lines = [_status_line(data)] + [
        f"  {e['at']}  {e['actor']}: {e['action']} {e['from_state'] or '-'} -> {e['to_state']}"
        + (f" ({e['reason']})" if e["reason"] else "")
        for e in data["history"]
    ]
    _emit(data, as_json, "\n".join(lines))


@request_app.command("review")
def review(
    request_id: RequestId,
    erase: Annotated[list[str], typer.Option("--erase", help="A match reference to erase. Repeatable.")] = [],  # noqa: B006
    keep: Annotated[list[str], typer.Option("--keep", help="A match reference to keep. Repeatable.")] = [],  # noqa: B006
    note: Annotated[Optional[str], typer.Option("--note", help="Why (recorded with each decision).")] = None,
    actor: ActorOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record review decisions on a request's borderline matches."""
    from db.session import unit_of_work
    from pipeline.lifecycle import ReviewInput, record_review_decisions

    decisions = [ReviewInput(ref, "erase", note) for ref in erase] + [ReviewInput(ref, "keep", note) for ref in keep]
    if not decisions:
        _fail("give at least one --erase REF or --keep REF")
    with _database(home, database_url) as (settings, engine), unit_of_work(engine) as session:
        data = _status_json(record_review_decisions(session, request_id, decisions, reviewer=_actor(actor),
                                                    key=settings.secret_key_bytes()))
    _emit(data, as_json, f"{len(decisions)} decision(s) recorded; " + _status_line(data))


@request_app.command("extend")
def extend(
    request_id: RequestId,
    months: Annotated[int, typer.Option("--months", help="Further months: 1 or 2 (at most 2 in total).")] = 1,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why the extension is necessary (required).")] = None,
    actor: ActorOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extend a request's deadline (Art. 12(3)); the reason is recorded."""
    from db.session import unit_of_work
    from pipeline.lifecycle import extend_deadline

    with _database(home, database_url) as (settings, engine), unit_of_work(engine) as session:
        data = _status_json(extend_deadline(session, request_id, months=months, reason=reason, actor=_actor(actor),
                                            key=settings.secret_key_bytes()))
    _emit(data, as_json, _status_line(data))


@request_app.command("deny")
def deny(
    request_id: RequestId,
    ground: Annotated[str, typer.Option("--ground", help="Art. 17(3) ground: freedom_of_expression, legal_obligation, "
                                        "public_health, archiving_research or legal_claims.")],
    detail: Annotated[Optional[str], typer.Option("--detail", help="The reasoning (required).")] = None,
    actor: ActorOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deny a request under an Art. 17(3) ground; its samples are deleted."""
    from db.session import unit_of_work
    from pipeline.lifecycle import deny_request

    with _database(home, database_url) as (settings, engine), unit_of_work(engine) as session:
        data = _status_json(deny_request(session, request_id, ground=ground, detail=detail, actor=_actor(actor),
                                         key=settings.secret_key_bytes()))
    _emit(data, as_json, _status_line(data))


def _duration(text: str) -> timedelta:
    """'90d', '12h', '0' (days when no unit)."""
    value, unit = (text[:-1], text[-1]) if text[-1:] in ("d", "h") else (text, "d")
    try:
        amount = float(value)
    except ValueError:
        _fail(f"--older-than {text!r}: write a duration such as 365d, 90d or 12h")
    if amount < 0:
        _fail(f"--older-than {text!r}: a duration is 0 or more")
    return timedelta(days=amount) if unit == "d" else timedelta(hours=amount)


@request_app.command("purge-notes")
def purge_notes_command(
    older_than: Annotated[Optional[str], typer.Option(
        "--older-than", help="Purge the notes of requests closed at least this long ago (e.g. 365d, 90d, 12h; "
        "default: the retention period, 365d).")] = None,
    actor: ActorOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete the notes (reasons, reviewers' notes, reviewed references) of closed
    requests whose retention period ended; the audit log keeps their keyed hashes."""
    from db.session import unit_of_work
    from pipeline.lifecycle import DEFAULT_NOTES_RETENTION, purge_notes

    window = _duration(older_than) if older_than else DEFAULT_NOTES_RETENTION
    with _database(home, database_url) as (_, engine), unit_of_work(engine) as session:
        data = purge_notes(session, older_than=window, actor=_actor(actor)).to_dict()
    _emit(data, as_json, f"deleted {data['notes_deleted']} note(s) of {data['requests_purged']} request(s) "
                         f"closed at least {data['older_than_days']:g} day(s) ago")


# ---------------------------------------------------------------- tokens


def _token_json(row: object) -> dict:
    return {
        "name": row.name,
        "scopes": sorted(row.scope_set),
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", help="A unique name, e.g. the client's (shown in request timelines).")],
    scope: Annotated[
        list[str], typer.Option("--scope", help="intake, review, audit, screen, generate or admin (all). Repeatable.")
    ] = [],  # noqa: B006
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API token; it is printed once and stored only as SHA-256."""
    from db.requests import issue_token
    from db.session import unit_of_work

    with _database(home, database_url) as (_, engine), unit_of_work(engine) as session:
        token, row = issue_token(session, name, scope)
        data = {**_token_json(row), "token": token}
    typer.echo("store this token now: it is not shown again", err=True)
    _emit(data, as_json, token)


@token_app.command("list")
def token_list(home: HomeOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List tokens (names and scopes; the tokens themselves are not stored)."""
    from db.requests import list_tokens
    from db.session import unit_of_work

    with _database(home, database_url) as (_, engine), unit_of_work(engine) as session:
        tokens = [_token_json(row) for row in list_tokens(session)]
    lines = [f"{t['name']}: {' '.join(t['scopes'])}" + (" (revoked)" if t["revoked_at"] else "") for t in tokens]
    _emit({"tokens": tokens}, as_json, "\n".join(lines) or "no tokens")


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: it is refused (401) from now on."""
    from db.requests import revoke_token
    from db.session import unit_of_work

    with _database(home, database_url) as (_, engine), unit_of_work(engine) as session:
        data = _token_json(revoke_token(session, name))
    _emit(data, as_json, f"token {name!r} revoked")


# ---------------------------------------------------------------- server


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    workers: Annotated[int, typer.Option("--workers", help="Worker processes (about one per core).")] = 1,
    home: HomeOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI document at /openapi.json, docs at /docs)."""
    import os

    import uvicorn

    from api.app import create_app

    if not 0 < port < 65536:
        _fail("--port must be between 1 and 65535")
    if not 1 <= workers <= 64:
        _fail("--workers must be between 1 and 64")
    settings = _settings(home, database_url)
    app = create_app(settings)  # brings the schema to head once, before any worker starts
    typer.echo(f"serving the erasure API on http://{host}:{port} with {workers} worker(s) (docs at /docs)", err=True)
    typer.echo(f"compliance console: http://{host}:{port}/console (sign in with a review or audit token)", err=True)
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    # Each worker process builds its own app from the same settings, passed by environment.
    os.environ["ERASURE_HOME"] = str(settings.home)
    os.environ["ERASURE_DATABASE_URL"] = settings.resolved_database_url
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, log_level=log_level, workers=workers)


if __name__ == "__main__":  # `python -m api.cli_requests ...`, until api/cli.py mounts these
    standalone = typer.Typer(add_completion=False, no_args_is_help=True)
    register_commands(standalone)
    standalone()

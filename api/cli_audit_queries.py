"""The audit query commands: ``erasure audit timeline | due | subject | ensemble | screen-reference``.

Thin: parse flags, call one query of ``db.audit_queries``, print. With
``--json`` each prints one JSON document on stdout, the same shape as the
matching /v1/audit answer; bad input exits with status 2 and a message on stderr.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from api.cli_common import (
    IDENTIFIER_HELP, DbOpt, HomeOpt, JsonOpt, emit, fail, parse_identifiers, request_id_arg, settings_from_flags,
)
from db.settings import Settings

DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="Only this dataset (default: all).")]


def register_commands(audit_app: typer.Typer) -> None:
    """Mount this module's commands on erasure audit."""
    audit_app.command("timeline")(timeline)
    audit_app.command("due")(due)
    audit_app.command("subject")(subject)
    audit_app.command("ensemble")(ensemble)
    audit_app.command("screen-reference")(screen_reference)


@contextmanager
def _session(home: Path | None, database_url: str | None) -> Iterator[tuple[Settings, Session]]:
    """Settings and a read transaction; the queries' and services' errors exit 2."""
    from db.audit_queries import AuditQueryError
    from db.session import unit_of_work
    from pipeline.database import open_database
    from pipeline.lifecycle import InvalidRequest

    settings = settings_from_flags(home, database_url)
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            yield settings, session
    except (AuditQueryError, InvalidRequest) as exc:
        fail(f"{exc.field}: {exc}" if exc.field else str(exc))
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()


def _dump(schema: type[BaseModel], result: object) -> dict:
    return schema.model_validate(result).model_dump(mode="json")


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors())


# ---------------------------------------------------------------- commands


def timeline(
    request_id: Annotated[str, typer.Argument(help="The request id (a UUID).")],
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A request's timeline: the audit log merged with its state history."""
    from api.schemas_audit import RequestTimelineOut
    from db.audit_queries import request_timeline

    request_id = request_id_arg(request_id)
    with _session(home, database_url) as (_, session):
        data = _dump(RequestTimelineOut, request_timeline(session, request_id))
    head = f"request {data['request_id']}: {data['state']}, due {data['due_at']}" + (" (OVERDUE)" if data["overdue"] else "")
    lines = [head, f"  {data['audit_log_events']} audit log event(s), {data['state_history_events']} state change(s)"]
    for e in data["entries"]:
        states = f" {e['from_state'] or '-'} -> {e['to_state']}" if e["to_state"] else ""
        extra = f" ({e['reason']})" if e["reason"] else ""
        if e["details"]:
            extra += " " + ", ".join(f"{k}={v}" for k, v in sorted(e["details"].items()))
        for note in e.get("notes") or ():
            extra += f" [{note['kind']} note {note['id']}: " + (note["text"] if note["text"] is not None
                                                                 else "purged") + "]"
        lines.append(f"  {e['at']}  {e['actor']}: {e['kind']}{states}{extra}  [{e['source']}]")
    emit(data, as_json, "\n".join(lines))


def due(
    within_days: Annotated[int, typer.Option("--within-days", help="Also list requests due within N days (0-366).")] = 7,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open requests past their deadline, and those due within --within-days."""
    from api.schemas_audit import MAX_WITHIN_DAYS, DueReportOut
    from db.audit_queries import due_requests
    from pipeline.lifecycle import OPEN_STATES

    if not 0 <= within_days <= MAX_WITHIN_DAYS:
        fail(f"--within-days must be 0 to {MAX_WITHIN_DAYS}, e.g. --within-days 7")
    with _session(home, database_url) as (_, session):
        data = _dump(DueReportOut, due_requests(session, open_states=OPEN_STATES, within_days=within_days))
    lines = [f"{len(data['overdue'])} overdue, {len(data['due_soon'])} due within {within_days} day(s)"]
    lines += [f"  OVERDUE  {r['request_id']}  {r['state']}, due {r['due_at']} ({-r['days_left']:.1f} days ago)"
              for r in data["overdue"]]
    lines += [f"  due      {r['request_id']}  {r['state']}, due {r['due_at']} (in {r['days_left']:.1f} days)"
              for r in data["due_soon"]]
    lines += [f"  UPSTREAM {a['request_id']}  {len(a['rows'])} row(s) in {a['path']} (sha256 {a['sha256'][:16]}…): "
              "delete them at the source, then `erasure audit upstream-done`" for a in data["upstream_open"]]
    emit(data, as_json, "\n".join(lines))


def subject(
    identifier: Annotated[
        list[str], typer.Option("--identifier", "-i", help=IDENTIFIER_HELP)
    ] = [],  # noqa: B006 - typer needs a literal default
    dataset: DatasetOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every record of a subject, and every shard version, checkpoint and ensemble version that held it."""
    from api.schemas_audit import SubjectIn, SubjectLineageOut
    from db.audit_queries import subject_lineage
    from pipeline.placement import subject_placement_view

    pairs = [{"kind": kind, "value": value} for kind, value in parse_identifiers(identifier)]
    if not pairs:
        fail("give at least one --identifier KIND=VALUE (or KIND:VALUE), e.g. -i email=jane@example.org")
    try:
        body = SubjectIn.model_validate({"identifiers": pairs, "dataset": dataset})
    except ValidationError as exc:
        fail(_problems(exc))
    with _session(home, database_url) as (settings, session):
        data = _dump(SubjectLineageOut, subject_lineage(session, body.keyed_hashes(settings.secret_key_bytes()),
                                                        dataset=body.dataset))
        # where the live records are, per dataset, and what their erasure would retrain
        data["placement"] = subject_placement_view(settings, session, [
            (r["dataset"], r["shard"], r["slice"]) for r in data["records"] if r["erased_in_shard_version"] is None])
    lines = [f"{len(data['records'])} record(s) ({data['erased']} erased); {len(data['requests'])} request(s); "
             f"{data['in_current_shard_versions']} in current shard versions, "
             f"{data['in_current_ensembles']} in current ensembles; "
             f"{len(data['ensemble_versions'])} ensemble version(s) ever trained on them"]
    for r in data["records"]:
        erased = f"erased in v{r['erased_in_shard_version']}" if r["erased_in_shard_version"] else "not erased"
        now = ("IN current shard version" if r["in_current_shard_version"] else "not in current shard version") + ", " + (
            "IN current ensemble" if r["in_current_ensemble"] else "not in current ensemble")
        lines.append(f"  {r['dataset']}/{r['record_id']}  shard {r['shard']} slice {r['slice']}, "
                     f"from v{r['first_shard_version']}, {erased}; {'+'.join(r['found_by'])}; "
                     f"versions {r['shard_versions']}, {len(r['checkpoints'])} checkpoint(s), "
                     f"{len(r['ensemble_versions'])} ensemble version(s); {now}")
    for p in data["placement"]:
        est = p["retrain_estimate"]
        where = ", ".join(f"shard {s['shard']} slice(s) {s['slices']}" for s in p["shards"])
        lines.append(f"  {p['dataset']} (placed by {p['placement']}): {where}; erasing them retrains "
                     f"{est['shards_touched']} shard(s), {est['fraction']:.1%} of a full retraining")
    emit(data, as_json, "\n".join(lines))


def ensemble(
    version_id: Annotated[str, typer.Argument(help="The ensemble version id (its content hash).")],
    dataset: DatasetOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The erasure requests an ensemble version reflects, and those whose erased data it still holds."""
    import re

    from api.schemas_audit import EnsembleReflectionsOut
    from db.audit_queries import ensemble_reflections

    if not re.fullmatch(r"[0-9a-f]{1,64}", version_id):
        fail(f"VERSION_ID {version_id!r} is not an ensemble version id (lower-case hex, e.g. from `erasure train`)")
    with _session(home, database_url) as (_, session):
        data = _dump(EnsembleReflectionsOut, ensemble_reflections(session, version_id, dataset=dataset))
    current = " (in service)" if data["is_current"] else ""
    lines = [f"ensemble {data['version_id']} of {data['dataset']}{current}, created {data['created_at']} "
             f"by {data['created_by']}; {len(data['lineage'])} version(s) in its lineage",
             f"  reflects {len(data['reflected'])} request(s); still holds erased records of "
             f"{len(data['still_holding'])}"]
    lines += [f"  reflected  {r['request_id']}  {r['state']}: {r['erased_records']} erased record(s), "
              f"jobs {r['retrain_jobs']}" for r in data["reflected"]]
    lines += [f"  HOLDS      {r['request_id']}  {r['state']}: {r['erased_records_held']} erased record(s)"
              for r in data["still_holding"]]
    emit(data, as_json, "\n".join(lines))


def screen_reference(
    reference: Annotated[str, typer.Argument(help="The opaque reference of a /v1/screen answer (scr_...).")],
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What a screen reference stands for: the dataset, erasure request and erased record."""
    from api.schemas_audit import ScreenReferenceOut
    from pipeline.screening import resolve_screen_reference

    with _session(home, database_url) as (settings, session):
        data = _dump(ScreenReferenceOut, resolve_screen_reference(settings, reference, engine=session.get_bind()))
    where = f"shard {data['shard']}, record {data['record_id']}" if data["record_id"] is not None else "no record id"
    emit(data, as_json, f"{data['reference']}: dataset {data['dataset']}, request {data['request_id']}, {where}")

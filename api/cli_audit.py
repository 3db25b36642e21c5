"""The ``erasure audit ...`` commands: what a compliance team shows a regulator.

``verify-log`` recomputes the hash chain of the audit log; ``residue`` checks
what an erased subject may have left behind and ``upstream-done`` closes an
upstream action (``pipeline/residue.py``); ``erasure gc`` (mounted here too)
sweeps the data home (``pipeline/gc.py``). The query commands
live in ``api/cli_audit_queries.py`` and the certificate commands in
``api/cli_certificates.py``; each mounts itself on ``audit_app``. Every command
has ``--json``; bad input exits with status 2 and a message on stderr.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from api.cli_common import DbOpt, HomeOpt, JsonOpt, emit, fail, request_id_arg, settings_from_flags
from flows.prefect_records import configured_reader

audit_app = typer.Typer(no_args_is_help=True, help="Audit: the tamper-evident log, queries, certificates.")


@audit_app.command("verify-log")
def verify_log(home: HomeOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Recompute the audit log's hash chain; name the first broken event (exit 1)."""
    from db.audit import verify_chain
    from db.session import unit_of_work
    from pipeline.database import open_database

    engine = open_database(settings_from_flags(home, database_url))
    try:
        with unit_of_work(engine) as session:
            verdict = verify_chain(session)
    finally:
        engine.dispose()
    if verdict.ok:
        human = (f"audit log intact: {verdict.events} event(s), chain head {verdict.last_hash}"
                 if verdict.events else "audit log is empty")
    else:
        human = f"audit log BROKEN at event {verdict.first_broken_id}: {verdict.problem}"
    emit(verdict.to_dict(), as_json, human)
    if not verdict.ok:
        raise typer.Exit(1)


@audit_app.command("residue")
def residue(
    request_id: Annotated[str, typer.Argument(help="The request id (a UUID).")],
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Do not ask Prefect's API (reported 'not_checked').")] = False,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check, without the erased text, that the request left nothing behind: the data home's
    files, the live shard versions, the database, Prefect's records; and list the source
    files that still hold the subject's rows upstream. Exit 1 when something is found."""
    from pipeline.lifecycle import RequestNotFound
    from pipeline.residue import check_residue_for

    settings = settings_from_flags(home, database_url)
    if not no_prefect and "PREFECT_API_URL" not in os.environ:
        from api.cli_flows import use_running_server

        use_running_server(settings)  # read the runs from a running `erasure up`
    try:
        report = check_residue_for(settings, request_id_arg(request_id),
                                   prefect_records=None if no_prefect else configured_reader())
    except RequestNotFound as exc:
        fail(str(exc))
    emit(report, as_json, residue_lines(report))
    if not report["clean"]:
        raise typer.Exit(1)


def residue_lines(report: dict) -> str:
    """The residue report in a few lines (counts and ids, no text)."""
    summary = report["summary"]
    lines = [f"residue of request {report['request_id']} ({report['state']}): "
             + ("CLEAN" if report["clean"] else "FOUND SOMETHING") + ("" if report["complete"] else
                                                                      " (Prefect not checked)")]
    inv, shards, db = report["inventory"], report["shards"], report["database"]
    lines.append(f"  files under the data home: {inv['files']}, orphans {inv['orphan_count']}"
                 + "".join(f"\n    orphan {o['kind']}: {o['path']} ({o['status']})" for o in inv["orphans"][:20]))
    lines.append(f"  live shard versions: {shards['versions_screened']} screened ({shards['records_screened']} records) "
                 f"against {sum(report['tombstones'].values())} tombstone(s) at Jaccard >= {shards['review_jaccard']}: "
                 f"{shards['hit_count']} hit(s), {shards['unresolved']} not decided 'keep' by a reviewer"
                 + "".join(f"\n    hit shard {h['shard']} v{h['version']} record {h['record_id']} "
                           f"(J~{h['estimated_jaccard']})" for h in shards["hits"][:20]))
    wal = db["sqlite_wal"]
    lines.append(f"  database ({db['backend']}): {db['hits']} hit(s); plain content digests of erased records: "
                 f"{db['unkeyed_content_digest']['erased_records_with_plain_digest']}"
                 f"{' (column content_sha256 present)' if db['unkeyed_content_digest']['column_present'] else ''}; "
                 f"samples left {db['samples']['left']}; audit events outside their schema "
                 f"{len(db['audit_log']['outside_schema'])}, holding the subject's text {len(db['audit_log']['with_subject_text'])}"
                 + (f"; WAL {wal['bytes']} bytes ({wal['hits']} hit(s))" if wal else ""))
    prefect = report["prefect"]
    lines.append(f"  Prefect: {prefect['status']}" + (f" ({prefect['reason']})" if prefect.get("reason") else
                                                       f", {prefect['flow_runs']} flow run(s), {len(prefect['hits'])} hit(s)"))
    for action in report["upstream"]:
        lines.append(f"  upstream {'OPEN' if action['open'] else 'done'}: {len(action['rows'])} row(s) of the subject in "
                     f"{action['path']} (sha256 {action['sha256'][:16]}…)")
    lines.append(f"  ({summary['orphans']} orphan(s), {summary['shard_hits_unresolved']} shard hit(s), "
                 f"{summary['database_hits']} database hit(s), {summary['upstream_open']} upstream action(s) open; "
                 f"{report['seconds']:.1f}s)")
    return "\n".join(lines)


@audit_app.command("upstream-done")
def upstream_done(
    request_id: Annotated[str, typer.Argument(help="The request id (a UUID).")],
    source: Annotated[str, typer.Option("--source", help="sha256 of the source file whose rows were deleted upstream.")],
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mark an upstream action done: the subject's rows were deleted from that source file."""
    import getpass

    from db.session import unit_of_work
    from pipeline.database import open_database
    from pipeline.lifecycle import RequestNotFound
    from pipeline.residue import mark_upstream_done

    settings = settings_from_flags(home, database_url)
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            result = mark_upstream_done(session, request_id_arg(request_id), source, actor=f"cli:{getpass.getuser()}")
    except (RequestNotFound, LookupError, ValueError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    still = sum(a["open"] for a in result["actions"])
    emit(result, as_json, f"upstream action done for {source[:16]}…; {still} still open for request {result['request_id']}")


def gc(
    grace_seconds: Annotated[float, typer.Option("--grace-seconds", help="Temporary files without a writer PID older than this are removed.")] = 3600.0,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove what killed or failed processes left under the data home (never a live file or one
    an open request needs), then truncate SQLite's write-ahead log / vacuum PostgreSQL's sample
    tables. Exit 1 when a deletion failed."""
    from pipeline.database import open_database
    from pipeline.gc import sweep

    if grace_seconds < 0:
        fail("--grace-seconds must be 0 or more")
    settings = settings_from_flags(home, database_url)
    engine = open_database(settings)
    try:
        report = sweep(settings, engine, grace_s=grace_seconds, actor="cli:gc").to_dict()
    finally:
        engine.dispose()
    removed = ", ".join(f"{n} {kind}" for kind, n in report["removed"].items()) or "nothing"
    human = [f"removed {removed}; superseded files purged: {report['purged_superseded']['shard_versions']} shard "
             f"version(s), {report['purged_superseded']['checkpoints']} checkpoint(s)"]
    if report["kept_in_flight"]:
        human.append("kept (a writer still runs): " + ", ".join(f"{n} {k}" for k, n in report["kept_in_flight"].items()))
    if report["deferred_shards"]:
        human.append(f"{len(report['deferred_shards'])} shard(s) wait for an erasure under way")
    human += [f"ERROR {e['kind']} {e['path']}: {e['error']}" for e in report["errors"]]
    emit(report, as_json, "\n".join(human))
    if report["errors"]:
        raise typer.Exit(1)


def register_commands(app: typer.Typer) -> None:
    """Mount ``audit`` (with the query and certificate commands) on the ``erasure`` app."""
    from api.cli_audit_queries import register_commands as register_queries
    from api.cli_certificates import register_commands as register_certificates

    register_queries(audit_app)
    register_certificates(audit_app)
    app.add_typer(audit_app, name="audit")
    app.command("gc")(gc)

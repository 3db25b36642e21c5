"""The ``erasure audit ...`` commands: what a compliance team shows a regulator.

``verify-log`` recomputes the hash chain of the audit log. The query commands
live in ``api/cli_audit_queries.py`` and the certificate commands in
``api/cli_certificates.py``; each mounts itself on ``audit_app``. Every command
has ``--json``; bad input exits with status 2 and a message on stderr.
"""

from __future__ import annotations

import typer

from api.cli_common import DbOpt, HomeOpt, JsonOpt, emit, settings_from_flags

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


def register_commands(app: typer.Typer) -> None:
    """Mount ``audit`` (with the query and certificate commands) on the ``erasure`` app."""
    from api.cli_audit_queries import register_commands as register_queries
    from api.cli_certificates import register_commands as register_certificates

    register_queries(audit_app)
    register_certificates(audit_app)
    app.add_typer(audit_app, name="audit")

"""The ``erasure lineage ...`` commands: the recorded lineage as OpenLineage events.

``export`` writes one OpenLineage RunEvent per line (a START and a COMPLETE per run of
ingest, train, erase and retrain), rebuilt from the database by
``pipeline.lineage_export``. Events go to ``--out FILE`` (written atomically) or to stdout
(``--out -``, the default); ``--json`` prints a summary on stdout and so needs a file.
Bad input exits with status 2 and a message on stderr.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from api.cli_common import DbOpt, HomeOpt, JsonOpt, emit, fail, settings_from_flags

lineage_app = typer.Typer(no_args_is_help=True, help="Lineage: OpenLineage events of ingest, training, erasure, retraining.")


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or date-time; one without an offset is read as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        fail(f"--since {text!r} is not an ISO 8601 date or time; use e.g. 2024-05-01 or 2024-05-01T12:00:00Z")
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written before any work is done."""
    if out.is_dir():
        fail(f"--out {out} is a directory; name a file, e.g. --out {out / 'lineage.jsonl'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        fail(f"--out {out}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        fail(f"--out {out} is not writable; choose a file in a folder you can write to")


@lineage_app.command("export")
def export(
    out: Annotated[str, typer.Option("--out", help="File to write the events to (JSON lines), or - for stdout.")] = "-",
    dataset: Annotated[Optional[str], typer.Option(help="Only this dataset (default: all).")] = None,
    since: Annotated[Optional[str], typer.Option(help="Only runs completed at or after this ISO time (UTC if no offset).")] = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the lineage in the database as OpenLineage RunEvents (JSON lines)."""
    from db.session import unit_of_work
    from pipeline.database import open_database
    from pipeline.lineage_export import export_lineage

    to_stdout = out == "-"
    if to_stdout and as_json:
        fail("--json prints a summary on stdout, where --out - writes the events; give --out FILE")
    cutoff = parse_since(since) if since is not None else None
    target = None if to_stdout else Path(out)
    if target is not None:
        check_writable(target)
    engine = open_database(settings_from_flags(home, database_url))
    try:
        with unit_of_work(engine) as session:
            try:
                counts = export_lineage(session, sys.stdout if target is None else target, dataset=dataset, since=cutoff)
            except LookupError as exc:
                fail(str(exc.args[0]) if exc.args else str(exc))
            except OSError as exc:
                fail(f"--out {out}: {exc.strerror or exc}")
    finally:
        engine.dispose()
    summary = {"out": "-" if target is None else str(target), "dataset": dataset,
               "since": cutoff.isoformat() if cutoff else None, **counts}
    runs = ", ".join(f"{n} {job}" for job, n in counts["runs"].items())
    human = f"{counts['events']} OpenLineage event(s) ({runs}) -> {summary['out']}"
    if to_stdout:
        typer.echo(human, err=True)  # stdout holds the events
    else:
        emit(summary, as_json, human)


def register_commands(app: typer.Typer) -> None:
    """Mount ``lineage`` on the ``erasure`` app."""
    app.add_typer(lineage_app, name="lineage")

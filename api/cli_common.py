"""What every ``erasure`` command shares: the common options, settings from
flags, one JSON document on stdout, and exit status 2 with a message on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from db.settings import Settings, load_settings

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="Data home (env ERASURE_HOME, default ./.erasure).")]
DbOpt = Annotated[
    Optional[str], typer.Option("--database-url", help="SQLAlchemy URL (env ERASURE_DATABASE_URL; default SQLite in the home).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def emit(data: dict, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    else:
        typer.echo(human)


def settings_from_flags(home: Path | None, database_url: str | None) -> Settings:
    try:
        return load_settings(home=home, database_url=database_url)
    except ValueError as exc:
        fail(str(exc))

"""What every ``erasure`` command shares: the common options, settings from
flags, one JSON document on stdout, exit status 2 with a message on bad input,
and the one parser of ``-i/--identifier`` (``kind=value`` or ``kind:value``)."""

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


def request_id_arg(value: str) -> str:
    """A request id given on the command line, as a canonical UUID; exit 2 otherwise."""
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        fail(f"{value!r} is not a request id (a UUID, as `erasure request submit` printed it)")


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


IDENTIFIER_HELP = "KIND=VALUE or KIND:VALUE, e.g. email=jane@example.com (kinds: email, user_id, name, phone). Repeatable."
IDENTIFIER_SEPARATORS = ("=", ":")


def parse_identifier(spec: str, known_kinds: tuple[str, ...]) -> tuple[str, str]:
    """``kind=value`` or ``kind:value`` -> (kind, value). The kind is what comes before the
    first ``=`` or ``:`` (no kind name holds either), so a value may contain both:
    ``user_id=a:b=c`` is (user_id, "a:b=c"). ValueError names the fix."""
    cut = min((i for i in (spec.find(sep) for sep in IDENTIFIER_SEPARATORS) if i >= 0), default=-1)
    example = "e.g. email=jane@example.com or email:jane@example.com"
    if cut < 0:
        raise ValueError(f"--identifier {spec[:20]!r}...: write KIND=VALUE or KIND:VALUE, {example} "
                         f"(kinds: {', '.join(known_kinds)})")
    kind, value = spec[:cut].strip(), spec[cut + 1:]
    if kind not in known_kinds:
        raise ValueError(f"--identifier: {kind[:40]!r} is not an identifier kind; use one of "
                         f"{', '.join(known_kinds)} ({example})")
    if not value.strip():
        raise ValueError(f"--identifier {kind}: the value is empty ({example})")
    return kind, value


def parse_identifiers(specs: list[str]) -> list[tuple[str, str]]:
    """Every ``-i`` option of a command, parsed; exits with status 2 naming the fix."""
    from pipeline.lifecycle import IDENTIFIER_KINDS

    try:
        return [parse_identifier(spec, IDENTIFIER_KINDS) for spec in specs]
    except ValueError as exc:
        fail(str(exc))

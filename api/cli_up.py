"""``erasure up``: run the whole service on this machine until Ctrl-C (``api/local_service.py``).

``register_commands(app)`` mounts it on the main ``erasure`` app.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from api.cli_common import DbOpt, HomeOpt, JsonOpt, fail, settings_from_flags


def register_commands(app: typer.Typer) -> None:
    app.command("up")(up)


def up(
    api_port: Annotated[int, typer.Option("--api-port", help="Port of the erasure API.")] = 8000,
    prefect_port: Annotated[int, typer.Option("--prefect-port", help="Port of the Prefect server (API and UI).")] = 4200,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start the service here: Prefect server, work pools, deployments, workers, migrations, API.
    Prints the URLs (and a first admin token on first start); Ctrl-C stops everything."""
    from api.local_service import LocalService, Stopping, UpError

    for flag, port in (("--api-port", api_port), ("--prefect-port", prefect_port)):
        if not 0 < port < 65536:
            fail(f"{flag} must be between 1 and 65535")
    if api_port == prefect_port:
        fail("--api-port and --prefect-port must differ")
    settings = settings_from_flags(home, database_url)

    def say(message: str) -> None:  # progress on stderr; stdout keeps the result
        typer.echo(message, err=True)

    service = LocalService(settings, api_port, prefect_port, say)
    service.install_signal_handlers()
    status = 0
    try:
        state = service.start()
        _print_ready(state, as_json)
        status = service.watch()
    except Stopping as signal_name:
        say(f"{signal_name}: stopping")
    except UpError as exc:
        say(f"error: {exc}")
        status = exc.code
    finally:
        service.stop()
        say("stopped: every process of erasure up has exited")
    if status:
        raise typer.Exit(status)


def _print_ready(state: dict, as_json: bool) -> None:
    token = state.get("admin_token")
    if as_json:
        sys.stdout.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    lines = [
        "erasure up: the service is running (Ctrl-C stops everything)",
        f"  API          {state['api_url']}  (docs {state['api_docs_url']})",
        f"  Prefect UI   {state['prefect_ui_url']}",
    ]
    if state.get("console_url"):
        lines.append(f"  console      {state['console_url']}")
    lines.append(f"  workers      {', '.join(state['workers'])}   logs {state['logs']}")
    lines.append(f"  database     {state['database']}")
    if token:
        lines.append(f"  admin token  {token}")
        lines.append("               (shown once, stored only as SHA-256: keep it now; "
                     "`erasure token create` makes more)")
    else:
        lines.append("  admin token  exists (not shown again; `erasure token list`, `erasure token create`)")
    typer.echo("\n".join(lines))
    sys.stdout.flush()

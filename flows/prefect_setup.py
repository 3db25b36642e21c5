"""Our Prefect defaults, applied before Prefect is imported.

Prefect reads most settings once, at import; every module of ours that imports
``prefect`` imports this module first. Each default yields to a value already
in the environment (an operator's ``PREFECT_API_URL`` of a real server wins).

- A temporary (ephemeral) server gets 120 s to start: its default 30 s is
  tight on small machines.
- No analytics, no UI for a temporary server.
- Task results are not persisted by default: our database is the record of
  what is done (a rerun skips done work by reading it), and persisted results
  would be a second copy of whatever a task returns. Tasks return ids and
  counts only; where a result is persisted it is JSON (readable by a scan).
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def apply_defaults(environ: dict[str, str] | os._Environ = os.environ) -> None:
    for name, value in DEFAULTS.items():
        environ.setdefault(name, value)


apply_defaults()

"""The state file of a running ``erasure up``: how other commands find its Prefect server.

``$ERASURE_HOME/up.json`` holds the supervisor's pid, the URLs, the ports and the
children's pids; never a token or a password (the database URL is written without
its credentials). It is written atomically when everything is up and removed when
``erasure up`` stops. A command trusts it only if the supervisor is alive and the
Prefect server answers ``/api/health`` (a stale file after a crash is ignored).

Imports only the standard library: every CLI command may read it at start-up.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

STATE_FILE = "up.json"
HEALTH_TIMEOUT_S = 2.0


def state_path(home: Path) -> Path:
    return Path(home) / STATE_FILE


def write_state(home: Path, state: dict) -> None:
    """Replace the state file atomically (a reader sees the old or the new one, never half)."""
    path = state_path(home)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_state(home: Path) -> dict | None:
    """The state file's contents, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(state_path(home).read_text())
    except (OSError, ValueError):
        return None


def remove_state(home: Path, pid: int) -> None:
    """Remove the state file if it is still ``pid``'s (a newer ``erasure up`` may own it)."""
    state = read_state(home)
    if state is not None and state.get("pid") == pid:
        state_path(home).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def prefect_answers(api_url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as answer:
            return answer.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def running_state(home: Path) -> dict | None:
    """The state of an ``erasure up`` that is running for ``home`` and whose Prefect server
    answers; None otherwise."""
    state = read_state(home)
    if not state or not isinstance(state.get("pid"), int) or not pid_alive(state["pid"]):
        return None
    if not prefect_answers(str(state.get("prefect_api_url", ""))):
        return None
    return state

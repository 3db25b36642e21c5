"""(being written)"""

from __future__ import annotations

import typer


def register_commands(audit_app: typer.Typer) -> None:
    """Mount this module's commands on erasure audit."""

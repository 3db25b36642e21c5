"""(being written)"""

from __future__ import annotations

import typer


def register_commands(app: typer.Typer) -> None:
    """Mount ``lineage`` on the ``erasure`` app."""

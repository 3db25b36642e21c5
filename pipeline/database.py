"""Opening the configured database: the schema is brought to head on first use."""

from __future__ import annotations

from sqlalchemy import Engine

from db.session import make_engine, upgrade_to_head
from db.settings import Settings

_upgraded: set[str] = set()


def open_database(settings: Settings) -> Engine:
    url = settings.resolved_database_url
    if url not in _upgraded:
        upgrade_to_head(url)
        _upgraded.add(url)
    return make_engine(url)

"""Opening the configured database: the schema is brought to head on first use.

One engine per database URL and process: SQLAlchemy caches compiled statements per engine, and
a flow task that opened a fresh engine per call recompiled every statement it ran (a fifth of a
warm locate's time at 1M records). The steps of a request (``pipeline/processing.py``) keep its
pooled connections open between calls: a reconnect per step cost a connection set-up (on SQLite,
re-reading the schema) inside every flow task. One-off commands ``dispose()`` it when done: that
closes the pooled connections and keeps the engine, and its statement cache, usable.
"""

from __future__ import annotations

import os
import threading

from sqlalchemy import Engine

from db.session import make_engine, upgrade_to_head
from db.settings import Settings

_upgraded: set[str] = set()
_engines: dict[tuple[str, int], Engine] = {}
_lock = threading.Lock()


def open_database(settings: Settings) -> Engine:
    url = settings.resolved_database_url
    key = (url, os.getpid())  # a forked child opens its own: pooled connections must not cross a fork
    with _lock:
        if url not in _upgraded:
            upgrade_to_head(url)
            _upgraded.add(url)
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(url)
        return engine

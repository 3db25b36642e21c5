"""Advisory locks that serialise writers of one shard or one dataset.

PostgreSQL: transaction-scoped advisory locks (``pg_advisory_xact_lock``), and a
session-level one held on its own connection for a whole retraining. SQLite has
a single writer: taking its write lock early is enough.

Key layout (64 bits): namespace (16) | kind (4) | dataset id (24) | shard (20).
Kinds: 1 shard writers (erasure, ingest, retraining claims), 2 dataset-wide
artefacts (ensemble versions, tombstones), 3 a shard's retraining.
"""

from __future__ import annotations

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

_LOCK_NAMESPACE = 0x5E15  # high bits of our advisory lock keys

def _lock_key(kind: int, dataset_id: int, shard: int) -> int:
    return (_LOCK_NAMESPACE << 48) | (kind << 44) | ((dataset_id & 0xFFFFFF) << 20) | (shard & 0xFFFFF)


def lock_shard(session: Session, dataset_id: int, shard: int) -> None:
    """Serialise writers of one shard until the transaction ends: an advisory lock
    on PostgreSQL; on SQLite a no-op write takes the database's single write lock
    now (before the shard is read), so a second writer waits or retries."""
    if session.connection().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(1, dataset_id, shard)})
    else:
        session.execute(text("UPDATE datasets SET id = id WHERE id = :id"), {"id": dataset_id})


def lock_dataset(session: Session, dataset_id: int) -> None:
    """Serialise updates of a dataset-wide artefact (ensemble version, tombstones)."""
    if session.connection().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(2, dataset_id, 0)})


class retrain_lock:
    """A session-level advisory lock on one shard's retraining, held on its own
    connection for the whole training (a killed process drops the connection and
    with it the lock). No-op on SQLite."""

    def __init__(self, engine: Engine, dataset_id: int, shard: int) -> None:
        self.engine, self.key, self.connection = engine, _lock_key(3, dataset_id, shard), None

    def __enter__(self) -> retrain_lock:
        if self.engine.dialect.name == "postgresql":
            self.connection = self.engine.connect()
            self.connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            self.connection.commit()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.connection is not None:
            try:
                self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                self.connection.commit()
            finally:
                self.connection.close()

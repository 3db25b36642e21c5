"""Advisory locks that serialise writers of one shard or one dataset.

PostgreSQL: transaction-scoped advisory locks (``pg_advisory_xact_lock``), and a
session-level one held on its own connection for a whole retraining. SQLite has
a single writer: taking its write lock early is enough.

Key layout (64 bits): namespace (16) | kind (4) | dataset id (24) | shard (20).
Kinds: 1 shard writers (erasure, ingest, retraining claims), 2 dataset-wide
artefacts (ensemble versions, tombstones), 3 a shard's retraining, 4 schema
migrations.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, text
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
    """A lock on one shard's retraining, held for the whole training; a killed process
    loses it with its connection or file descriptor.

    PostgreSQL: a session-level advisory lock on its own connection. SQLite (one machine,
    one writer, no advisory locks): an exclusive ``flock`` on a file beside the database,
    so two runs of one request (two review decisions each start one) never retrain the
    same shard side by side. In-memory SQLite: none needed (one process)."""

    def __init__(self, engine: Engine, dataset_id: int, shard: int) -> None:
        self.engine, self.key, self.connection = engine, _lock_key(3, dataset_id, shard), None
        self.lock_fd: int | None = None

    def __enter__(self) -> retrain_lock:
        if self.engine.dialect.name == "postgresql":
            self.connection = self.engine.connect()
            self.connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            self.connection.commit()
        else:
            self.lock_fd = _flock_beside(self.engine.url.database, f"retrain-{self.key:016x}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock_fd is not None:
            fd, self.lock_fd = self.lock_fd, None
            os.close(fd)  # closing the descriptor releases the flock
        if self.connection is not None:
            try:
                self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                self.connection.commit()
            finally:
                self.connection.close()


@contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Hold the schema-migration lock on ``connection`` for the block: two processes that migrate
    one database at once (``erasure up`` starting while a CLI command runs) take turns, and the
    second finds the schema at head instead of creating the same tables beside the first.

    PostgreSQL: a session-level advisory lock (released with the connection if the process dies).
    SQLite: an exclusive ``flock`` on a file beside the database; in-memory: none (one process)."""
    if connection.dialect.name == "postgresql":
        key = _lock_key(4, 0, 0)
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        connection.commit()
        try:
            yield
        finally:
            connection.rollback()  # a failed migration leaves its transaction aborted
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()
        return
    fd = _flock_beside(connection.engine.url.database, "migrate")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


def _flock_beside(database: str | None, name: str) -> int | None:
    """An exclusive ``flock`` (waited for) on ``<database>.<name>.lock`` beside a SQLite database
    file; its descriptor, which the caller closes to release it. None for an in-memory database."""
    if database in (None, "", ":memory:"):
        return None
    path = Path(database).resolve()
    fd = os.open(path.with_name(f"{path.name}.{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_lock_file(path: Path, database: Path) -> bool:
    """Whether ``path`` is one of the empty lock files ``_flock_beside`` makes beside ``database``
    (``<db>.migrate.lock``, ``<db>.retrain-<key>.lock``): it holds no data."""
    return path.parent == database.parent and path.name.startswith(f"{database.name}.") and path.suffix == ".lock"

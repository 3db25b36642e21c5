"""Backend maintenance after an erasure: what deleting a row leaves behind.

SQLite (WAL mode, ``secure_delete`` on): a deleted row is zeroed in the database
file, but the write-ahead log (``<db>-wal``) still holds the page images written
before, the purged samples among them, until a checkpoint. ``after_erasure``
runs ``VACUUM`` (when asked: the request had samples) and then
``PRAGMA wal_checkpoint(TRUNCATE)``, which copies the log into the database and
truncates the ``-wal`` file to zero bytes. A reader holding an old snapshot
makes the checkpoint report busy: then ``wal_truncated`` is false and the next
sweep tries again.

PostgreSQL: a deleted row stays in its table's pages as a dead tuple until
VACUUM makes the space reusable (and until it is overwritten); ``VACUUM (FULL)``
rewrites the table into new files and drops the old ones. ``after_erasure``
runs ``VACUUM (FULL)`` on the tables that held request content (samples, and
request notes where that table exists), which are small, with a lock timeout so
intake never waits long; on a timeout it falls back to a plain ``VACUUM``. The
server's own write-ahead log and any base backups keep the deleted bytes until
they are recycled: that is the operator's retention setting, stated in the README.
VACUUM cannot run inside a transaction: it uses an autocommit connection.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import OperationalError

# tables whose deleted rows held what a subject sent (free text)
CONTENT_TABLES = ("request_samples", "request_notes")
PG_LOCK_TIMEOUT = "5s"


def sqlite_path(engine: Engine) -> Path | None:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database).resolve()


def wal_size(engine: Engine) -> int | None:
    """Bytes in the SQLite write-ahead log (0 when absent); None on other backends."""
    path = sqlite_path(engine)
    if path is None:
        return None
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def after_erasure(engine: Engine, *, vacuum: bool, tables: tuple[str, ...] = CONTENT_TABLES,
                  lock_timeout: str | None = PG_LOCK_TIMEOUT) -> dict:
    """The backend's maintenance after rows holding personal data were deleted; what was done.

    PostgreSQL rewrites ``tables``; with ``lock_timeout`` None it waits for their locks
    instead of falling back to a plain VACUUM (a one-off compaction that must happen)."""
    if engine.dialect.name == "sqlite":
        return _sqlite(engine, vacuum)
    if engine.dialect.name == "postgresql":
        return _postgresql(engine, tables, lock_timeout)
    return {"backend": engine.dialect.name, "done": []}


def _sqlite(engine: Engine, vacuum: bool) -> dict:
    raw = engine.raw_connection()
    driver = raw.driver_connection
    saved = driver.isolation_level
    try:
        driver.isolation_level = None  # autocommit: VACUUM cannot run in a transaction
        done = []
        if vacuum:
            driver.execute("VACUUM")
            done.append("vacuum")
        busy, log_frames, checkpointed = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        done.append("wal_checkpoint_truncate")
    finally:
        driver.isolation_level = saved
        raw.close()
    return {"backend": "sqlite", "done": done, "wal_truncated": busy == 0, "wal_bytes": wal_size(engine),
            "wal_frames_checkpointed": checkpointed}


def _postgresql(engine: Engine, tables: tuple[str, ...], lock_timeout: str | None) -> dict:
    with engine.connect() as probe:
        present = [t for t in tables if inspect(probe).has_table(t)]
    full, plain = [], []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if lock_timeout is not None:
            conn.execute(text(f"SET lock_timeout = '{lock_timeout}'"))
        for table in present:
            try:
                conn.execute(text(f'VACUUM (FULL) "{table}"'))
                full.append(table)
            except OperationalError as exc:  # only a lock timeout falls back to a plain VACUUM
                if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                    raise
                conn.execute(text(f'VACUUM "{table}"'))
                plain.append(table)
    return {"backend": "postgresql", "done": ["vacuum"], "vacuum_full": full, "vacuum": plain}


def dead_tuples(engine: Engine, tables: tuple[str, ...] = CONTENT_TABLES) -> dict[str, int] | None:
    """PostgreSQL's count of dead tuples per table (statistics; may lag a little); None elsewhere."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT relname, n_dead_tup FROM pg_stat_user_tables WHERE relname = ANY(:t)"),
                            {"t": list(tables)}).all()
    return {name: int(count) for name, count in rows}

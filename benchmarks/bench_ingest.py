"""Ingest benchmark: N demo records into a fresh PostgreSQL database.

Prints one JSON document: records/s overall and for the lineage insert (COPY)
alone, the time of each phase, and the peak memory of the ingest process.
Goal (issue 2): >= 20,000 records/s for the lineage insert, peak < 2 GB at 1M.

The physical limit, measured in the same run (issue 12): after the ingest, the
same ``records`` and ``record_identifiers`` rows, read back and held in memory,
are written three ways in three interleaved rounds, each after a checkpoint:
our lineage insert (into the emptied tables, keys rebuilt, as a first ingest
does), a plain COPY (psycopg, text format, one committed transaction) into
tables of the same columns without any index, key or constraint, and the same
rows' binary COPY bytes, encoded before the clock starts (the server's floor,
stricter). Goal: lineage records/s >= 0.5 x the plain COPY's (medians).
``phases_s`` is the ingest's own run: its lineage transaction split into sending
the rows (``lineage_rows_s``) and rebuilding the keys (``lineage_keys_s``, when
``lineage_keys`` is "rebuild").

    .venv/bin/python benchmarks/bench_ingest.py --records 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_LINEAGE_RPS = 20_000
GOAL_PEAK_MB = 2048
GOAL_RATIO_TO_PLAIN_COPY = 0.5
LINEAGE_TABLES = {"records": "dataset_id, record_id, shard, slice, content_hmac, source_file_id, row_number, "
                             "first_shard_version",
                  "record_identifiers": "dataset_id, record_id, kind, keyed_hash"}
KEY_ORDER = {"records": 'record_id COLLATE "C"',
             "record_identifiers": 'keyed_hash, kind COLLATE "C", record_id COLLATE "C"'}


ROUNDS = 3
WAYS = ("lineage", "plain_text", "plain_binary")


def _checkpoint(conn: psycopg.Connection) -> bool:
    """A CHECKPOINT now, where this user may (superuser or pg_checkpoint), so that a measured write
    starts with the WAL of earlier ones flushed and no checkpoint they triggered running beside it
    (each write here is 100-200 MB of WAL; the server's max_wal_size is 1 GB). False: not permitted."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        return False
    conn.commit()
    return True


def _rounds(url: str) -> dict[str, list[float] | int | bool]:
    """Seconds per round of three ways of writing the ingested lineage rows, rounds interleaved
    (the ways measured side by side, not minutes apart), each after a checkpoint:

    - ``lineage``: our lineage insert (``db.lineage``: ``lineage_bulk_load`` + ``bulk_insert``, one
      committed transaction) of the rows as the ingest sends them (Arrow, sorted by key), into the
      emptied ``records`` and ``record_identifiers``: keys rebuilt, as on a first ingest;
    - ``plain_text``: the issue's plain COPY, as a client writes it (psycopg rows in COPY's default
      text format) into unindexed twins (same columns, no index, key, default or constraint);
    - ``plain_binary``: the server's floor: the rows' binary COPY bytes, encoded before the clock
      starts, streamed into unindexed twins.
    """
    import pyarrow as pa
    from sqlalchemy import text

    from db.lineage import IDENTIFIER_COLUMNS, RECORD_COLUMNS, bulk_insert, lineage_bulk_load
    from db.session import make_engine, unit_of_work

    plain_url = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain_url) as conn:
        # each table read once, sorted by its key (bytewise) as the ingest sends it
        rows = {table: conn.execute(f"SELECT {columns} FROM {table} ORDER BY {KEY_ORDER[table]}").fetchall()
                for table, columns in LINEAGE_TABLES.items()}
        payload = {}
        for table, columns in LINEAGE_TABLES.items():
            with conn.cursor().copy(f"COPY (SELECT {columns} FROM {table}) TO STDOUT (FORMAT binary)") as copy:
                payload[table] = b"".join(bytes(block) for block in copy)
        # the ingest's Arrow rows; the hashes as the column stores them (bytes since migration 0017;
        # hex before, so that the benchmark also measures older code)
        hash_type = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                                 "attrelid = 'record_identifiers'::regclass AND attname = 'keyed_hash'").fetchone()[0]
        types = {"records": [pa.string() if c in ("record_id", "content_hmac") else pa.int32() for c in RECORD_COLUMNS],
                 "record_identifiers": [pa.int32(), pa.string(), pa.string(),
                                        pa.binary(32) if hash_type == "bytea" else pa.string()]}
        names = {"records": RECORD_COLUMNS, "record_identifiers": IDENTIFIER_COLUMNS}
        arrow = {table: pa.table([pa.array(list(values), type_) for values, type_ in zip(zip(*rows[table]), types[table])],
                                 names=list(names[table])) for table in LINEAGE_TABLES}
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        checkpointed = True
        engine = make_engine(url)
        try:
            for _ in range(ROUNDS):
                for way in WAYS:
                    if way == "lineage":
                        conn.execute("TRUNCATE records, record_identifiers")
                    else:
                        for table in LINEAGE_TABLES:
                            conn.execute(f"CREATE TABLE plain_{table} (LIKE {table})")
                    conn.commit()
                    checkpointed &= _checkpoint(conn)
                    started = time.perf_counter()
                    if way == "lineage":
                        with unit_of_work(engine) as session:
                            with lineage_bulk_load(session, arrow["records"].num_rows) as keys:
                                for table in LINEAGE_TABLES:
                                    bulk_insert(session, table, arrow[table])
                        if keys != "rebuild":
                            raise RuntimeError(f"the lineage round kept its keys {keys}, not rebuilt")
                    else:
                        with conn.cursor() as cursor:
                            for table, columns in LINEAGE_TABLES.items():
                                _plain_copy(cursor, f"plain_{table} ({columns})", rows[table] if way == "plain_text"
                                            else None, payload[table])
                        conn.commit()
                    seconds[way].append(time.perf_counter() - started)
                    if way != "lineage":
                        for table in LINEAGE_TABLES:
                            conn.execute(f"DROP TABLE plain_{table}")
                        conn.commit()
            with engine.connect() as check:  # the last lineage round left every row in place
                held = check.execute(text("SELECT (SELECT count(*) FROM records), (SELECT count(*) FROM record_identifiers)")).one()
            if tuple(held) != tuple(len(rows[t]) for t in LINEAGE_TABLES):
                raise RuntimeError(f"the lineage rounds wrote {tuple(held)} rows, not {[len(r) for r in rows.values()]}")
        finally:
            engine.dispose()
        return {**seconds, "rows": sum(len(r) for r in rows.values()), "checkpointed": checkpointed}


def _plain_copy(cursor: psycopg.Cursor, target: str, rows: list[tuple] | None, payload: bytes) -> None:
    """One plain COPY: ``rows`` through psycopg in text format, or (None) ``payload`` as binary COPY bytes."""
    if rows is not None:
        with cursor.copy(f"COPY {target} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    with cursor.copy(f"COPY {target} FROM STDIN (FORMAT binary)") as copy:
        view = memoryview(payload)
        for at in range(0, len(view), 1 << 20):
            copy.write(view[at:at + (1 << 20)])


def _ingest_child(records: str, home: str, url: str) -> None:
    """Runs in its own process so that peak RSS is the ingest's alone."""
    from db.settings import Settings
    from api.demo import DEMO_FIELDS
    from pipeline.ingest import IngestOptions, ingest_source_file
    from pipeline.progress import RichReporter

    settings = Settings(home=Path(home), database_url=url, secret_key="benchmark-secret-key-0123456789")
    with RichReporter() as reporter:
        summary = ingest_source_file(
            records, IngestOptions(dataset="bench", fields=DEMO_FIELDS, n_shards=8, n_slices=4), settings, reporter
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"summary": summary.to_json(), "peak_rss_mb": round(peak_mb, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--postgres-url", default=os.environ.get(
        "ERASURE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _ingest_child(*args.child)
        return

    from shards.demo_data import write_demo

    admin = args.postgres_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"erasure_bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            started = time.perf_counter()
            files = write_demo(Path(tmp) / "demo", args.records, seed=0)
            generate_s = time.perf_counter() - started
            url = "postgresql+psycopg://" + admin.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
            checkpointed = _checkpoint(conn)  # before the ingest: its lineage phase comes ~1 min later
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(files.records), str(Path(tmp) / "home"), url],
                capture_output=False, stdout=subprocess.PIPE, text=True, check=True,
            )
            wall = time.perf_counter() - started
            result = json.loads(child.stdout.strip().splitlines()[-1])
            rounds = _rounds(url)
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    summary = result["summary"]
    timings = summary["timings"]
    records = summary["new_records"]
    median = {way: statistics.median(rounds[way]) for way in WAYS}
    print(json.dumps({
        "benchmark": "ingest",
        "records": records,
        "shards": summary["shards"],
        "slices": summary["slices"],
        "backend": "postgresql (COPY)",
        "demo_generation_s": round(generate_s, 2),
        "ingest_wall_s": round(wall, 2),
        "ingest_in_process_s": summary["seconds"],
        "phases_s": timings,
        # "rebuild": keys dropped and rebuilt set-wise in the transaction (db.lineage.lineage_bulk_load)
        "lineage_keys": summary.get("lineage_keys"),
        "records_per_s_overall": round(records / summary["seconds"]),
        "records_per_s_lineage_in_ingest": round(records / timings["lineage_s"]),
        "lineage_goal_records_per_s": GOAL_LINEAGE_RPS,
        "lineage_ratio_to_goal": round(records / timings["lineage_s"] / GOAL_LINEAGE_RPS, 2),
        "rows_written": rounds["rows"],
        "checkpoint_before_each_write": rounds["checkpointed"] and checkpointed,
        # the lineage insert and its baselines, ROUNDS interleaved rounds each, medians
        "rounds_s": {way: [round(x, 3) for x in rounds[way]] for way in WAYS},
        "lineage_s": round(median["lineage"], 3),
        "records_per_s_lineage_insert": round(records / median["lineage"]),
        "baseline": "plain COPY of the same records + record_identifiers rows into unindexed tables "
                    "(psycopg rows, text format)",
        "plain_copy_s": round(median["plain_text"], 3),
        "records_per_s_plain_copy": round(records / median["plain_text"]),
        "ratio_lineage_to_plain_copy": round(median["plain_text"] / median["lineage"], 3),
        "goal_ratio_to_plain_copy": GOAL_RATIO_TO_PLAIN_COPY,
        # the stricter reference: the same rows as binary COPY bytes, encoded before the clock starts
        "plain_binary_copy_s": round(median["plain_binary"], 3),
        "ratio_lineage_to_plain_binary_copy": round(median["plain_binary"] / median["lineage"], 3),
        # the ingest's own lineage transaction, one measurement, minutes before the rounds
        "ratio_in_ingest_to_plain_copy": round(median["plain_text"] / timings["lineage_s"], 3),
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_goal_mb": GOAL_PEAK_MB,
    }, indent=2))


if __name__ == "__main__":
    main()

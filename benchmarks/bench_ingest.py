"""Ingest benchmark: N demo records into a fresh PostgreSQL database.

Prints one JSON document: records/s overall and for the lineage insert (COPY)
alone, the time of each phase, and the peak memory of the ingest process.
Goal (issue 2): >= 20,000 records/s for the lineage insert, peak < 2 GB at 1M.

The physical limit, measured in the same run (issue 12): the same ``records``
and ``record_identifiers`` rows, read back and held in memory, written with a
plain COPY (psycopg, one transaction, committed) into tables of the same columns
without any index, key or constraint; three rounds, the median. Goal: lineage
records/s >= 0.5 x that. Also reported: the ratio to streaming the same rows'
binary COPY bytes, encoded before the clock starts (the server's floor, stricter).
``phases_s`` splits the lineage transaction into sending the rows (``lineage_rows_s``) and
rebuilding the keys (``lineage_keys_s``, when ``lineage_keys`` is "rebuild").

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


PLAIN_COPY_ROUNDS = 3


def _checkpoint(conn: psycopg.Connection) -> bool:
    """A CHECKPOINT now, where this user may (superuser or pg_checkpoint), so that a measured write
    starts with the WAL of earlier ones flushed and no checkpoint they triggered running beside it
    (each phase writes 100-200 MB of WAL; the server's max_wal_size is 1 GB). False: not permitted."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        return False
    conn.commit()
    return True


def _plain_copy_s(url: str) -> dict[str, list[float] | int]:
    """Seconds to COPY the ingested lineage rows into unindexed twins of their tables, per round,
    two ways, rounds interleaved: ``text`` (the issue's plain COPY, as a client writes it: psycopg
    rows in COPY's default text format) and ``binary`` (the server's floor: the rows' binary COPY
    bytes, encoded before the clock starts, streamed); and the rows copied."""
    with psycopg.connect(url) as conn:
        rows = {table: conn.execute(f"SELECT {columns} FROM {table}").fetchall()
                for table, columns in LINEAGE_TABLES.items()}
        payload = {}
        for table, columns in LINEAGE_TABLES.items():
            with conn.cursor().copy(f"COPY (SELECT {columns} FROM {table}) TO STDOUT (FORMAT binary)") as copy:
                payload[table] = b"".join(bytes(block) for block in copy)
        seconds: dict[str, list[float]] = {"text": [], "binary": []}
        for _ in range(PLAIN_COPY_ROUNDS):
            for wire in seconds:
                for table in LINEAGE_TABLES:  # same column types, no index, key, default or constraint
                    conn.execute(f"CREATE TABLE plain_{table} (LIKE {table})")
                conn.commit()
                _checkpoint(conn)
                started = time.perf_counter()
                with conn.cursor() as cursor:
                    for table, columns in LINEAGE_TABLES.items():
                        if wire == "text":
                            with cursor.copy(f"COPY plain_{table} ({columns}) FROM STDIN") as copy:
                                for row in rows[table]:
                                    copy.write_row(row)
                        else:
                            with cursor.copy(f"COPY plain_{table} ({columns}) FROM STDIN (FORMAT binary)") as copy:
                                view = memoryview(payload[table])
                                for at in range(0, len(view), 1 << 20):
                                    copy.write(view[at:at + (1 << 20)])
                conn.commit()
                seconds[wire].append(time.perf_counter() - started)
                for table in LINEAGE_TABLES:
                    conn.execute(f"DROP TABLE plain_{table}")
                conn.commit()
        return {**seconds, "rows": sum(len(r) for r in rows.values())}


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
            plain = _plain_copy_s(url.replace("postgresql+psycopg://", "postgresql://"))
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    summary = result["summary"]
    timings = summary["timings"]
    lineage_rps = summary["new_records"] / timings["lineage_s"]
    plain_s = statistics.median(plain["text"])
    plain_binary_s = statistics.median(plain["binary"])
    plain_rps = summary["new_records"] / plain_s
    print(json.dumps({
        "benchmark": "ingest",
        "records": summary["new_records"],
        "shards": summary["shards"],
        "slices": summary["slices"],
        "backend": "postgresql (COPY)",
        "demo_generation_s": round(generate_s, 2),
        "ingest_wall_s": round(wall, 2),
        "ingest_in_process_s": summary["seconds"],
        "phases_s": timings,
        # "rebuild": keys dropped and rebuilt set-wise in the transaction (db.lineage.lineage_bulk_load)
        "lineage_keys": summary.get("lineage_keys"),
        "records_per_s_overall": round(summary["new_records"] / summary["seconds"]),
        "records_per_s_lineage_insert": round(lineage_rps),
        "lineage_goal_records_per_s": GOAL_LINEAGE_RPS,
        "lineage_ratio_to_goal": round(lineage_rps / GOAL_LINEAGE_RPS, 2),
        "baseline": "plain COPY of the same records + record_identifiers rows into unindexed tables "
                    f"(median of {PLAIN_COPY_ROUNDS} rounds)",
        "checkpoint_before_each_phase": checkpointed,
        "plain_copy_s": round(plain_s, 3),
        "plain_copy_rounds_s": [round(x, 3) for x in plain["text"]],
        "plain_copy_rows": plain["rows"],
        "records_per_s_plain_copy": round(plain_rps),
        "ratio_lineage_to_plain_copy": round(lineage_rps / plain_rps, 3),
        # the stricter reference: the same rows as binary COPY bytes, encoded before the clock starts
        "plain_copy_binary_s": round(plain_binary_s, 3),
        "plain_copy_binary_rounds_s": [round(x, 3) for x in plain["binary"]],
        "ratio_lineage_to_plain_binary_copy": round(plain_binary_s / timings["lineage_s"], 3),
        "goal_ratio_to_plain_copy": GOAL_RATIO_TO_PLAIN_COPY,
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_goal_mb": GOAL_PEAK_MB,
    }, indent=2))


if __name__ == "__main__":
    main()

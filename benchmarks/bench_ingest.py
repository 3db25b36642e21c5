"""Ingest benchmark: N demo records into a fresh PostgreSQL database.

Prints one JSON document: records/s overall and for the lineage insert (COPY)
alone, the time of each phase, and the peak memory of the ingest process.
Goal (issue 2): >= 20,000 records/s for the lineage insert, peak < 2 GB at 1M.

The physical limit, measured in the same run (issue 12): the same ``records``
and ``record_identifiers`` rows, read back and held in memory, written with a
plain COPY (psycopg, one transaction, committed) into tables of the same columns
without any index, key or constraint. Goal: lineage records/s >= 0.5 x that.
``phases_s`` splits the lineage transaction into sending the rows (``lineage_rows_s``) and
rebuilding the keys (``lineage_keys_s``, when ``lineage_keys`` is "rebuild").

    .venv/bin/python benchmarks/bench_ingest.py --records 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _plain_copy_s(url: str) -> tuple[float, int]:
    """Seconds to COPY the ingested lineage rows into unindexed twins of their tables; rows copied."""
    with psycopg.connect(url) as conn:
        rows = {table: conn.execute(f"SELECT {columns} FROM {table}").fetchall()
                for table, columns in LINEAGE_TABLES.items()}
        for table in LINEAGE_TABLES:  # same column types, no index, key, default or constraint
            conn.execute(f"CREATE TABLE plain_{table} (LIKE {table})")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cursor:
            for table, columns in LINEAGE_TABLES.items():
                with cursor.copy(f"COPY plain_{table} ({columns}) FROM STDIN") as copy:
                    for row in rows[table]:
                        copy.write_row(row)
        conn.commit()
        return time.perf_counter() - started, sum(len(r) for r in rows.values())


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
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(files.records), str(Path(tmp) / "home"), url],
                capture_output=False, stdout=subprocess.PIPE, text=True, check=True,
            )
            wall = time.perf_counter() - started
            result = json.loads(child.stdout.strip().splitlines()[-1])
            plain_s, plain_rows = _plain_copy_s(url.replace("postgresql+psycopg://", "postgresql://"))
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    summary = result["summary"]
    timings = summary["timings"]
    lineage_rps = summary["new_records"] / timings["lineage_s"]
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
        "baseline": "plain COPY of the same records + record_identifiers rows into unindexed tables",
        "plain_copy_s": round(plain_s, 3),
        "plain_copy_rows": plain_rows,
        "records_per_s_plain_copy": round(plain_rps),
        "ratio_lineage_to_plain_copy": round(lineage_rps / plain_rps, 3),
        "goal_ratio_to_plain_copy": GOAL_RATIO_TO_PLAIN_COPY,
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_goal_mb": GOAL_PEAK_MB,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Seconds of the locate step of one erasure request as the flow task runs it, with and without
the process's artefact cache.

The real path: ``pipeline.processing.locate_and_record(request_id, dataset)`` (what the
``locate-and-record`` task of ``process_erasure_request`` calls) in one warm process, the
shard indexes on disk as ingest saved them, one stored request per call (each a demo person
by e-mail, moved to ``locating`` first), the matches recorded in the database. Without the
cache every call reads every shard's index from disk (the behaviour before the cache); with
it the first call after the cache is cleared loads them (``cold_first_s``) and the rest are
served from memory. The ratio of the p50s is the figure.

    .venv/bin/python benchmarks/bench_hot_paths.py --records 100000
    .venv/bin/python benchmarks/bench_hot_paths.py --records 20000,100000   # scaling, one run each
    .venv/bin/python benchmarks/bench_hot_paths.py --records 1000000 --keep-home /var/tmp/hot   # build once, rerun
    .venv/bin/python benchmarks/bench_hot_paths.py --records 100000 --database-url postgresql+psycopg://postgres@127.0.0.1/bench

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _quantiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1e3, 2), "p95_ms": round(p95 * 1e3, 2),
            "max_ms": round(ordered[-1] * 1e3, 2)}


def run_size(records: int, args: argparse.Namespace) -> dict:
    home = args.keep_home / f"hot-{records}" if args.keep_home else Path(tempfile.mkdtemp(prefix=f"bench-hot-{records}-",
                                                                                          dir=args.home))
    from api.demo import DEMO_FIELDS
    from db.settings import Settings, use_settings
    from pipeline import processing
    from pipeline.artefact_cache import ARTEFACTS, DEFAULT_MAX_MB
    from pipeline.database import open_database
    from pipeline.ingest import IngestOptions, ingest_source_file
    from pipeline.lifecycle import submit_request
    from shards.demo_data import read_ground_truth, write_demo

    database_url = args.database_url
    if database_url and database_url.startswith("postgresql"):  # a fresh database per size
        from sqlalchemy import create_engine, text

        admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
        name = f"bench_hot_{records}_{os.getpid()}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        database_url = database_url.rsplit("/", 1)[0] + "/" + name
    settings = Settings(home=home, database_url=database_url, secret_key="bench-secret-key-0123456789abcdef")
    figures: dict = {"records": records, "shards": args.shards, "embedder": args.embedder,
                     "database": settings.resolved_database_url.split(":", 1)[0].split("+")[0]}
    built = home / "built.json"  # --keep-home: the data of an earlier run, built with the same options
    if built.exists() and json.loads(built.read_text()) == {"shards": args.shards, "embedder": args.embedder}:
        ground_truth = home / "demo-data" / "ground_truth.jsonl"
        figures["reused_data_home"] = str(home)
    else:
        t = time.perf_counter()
        files = write_demo(home / "demo-data", records, seed=0)
        figures["generate_s"] = round(time.perf_counter() - t, 2)
        ground_truth = files.ground_truth
        t = time.perf_counter()
        ingest_source_file(files.records, IngestOptions(dataset="bench", fields=DEMO_FIELDS, n_shards=args.shards,
                                                        embedder=args.embedder), settings)
        figures["ingest_s"] = round(time.perf_counter() - t, 2)
        if args.keep_home:
            built.write_text(json.dumps({"shards": args.shards, "embedder": args.embedder}))
    figures["index_bytes_on_disk"] = sum(p.stat().st_size for p in home.glob("shards/**/*.dedup/*"))

    # only the e-mails: a million ground-truth dicts kept alive here would make every garbage
    # collection of the timed process walk them, which a worker never carries
    emails = [p["email"] for p in read_ground_truth(ground_truth)["persons"] if p["originals"]]
    gc.collect()
    engine = open_database(settings)
    key = settings.secret_key_bytes()

    run = uuid.uuid4().hex[:8]  # a reused home keeps the requests of earlier runs

    def new_request(i: int) -> str:
        request_id = str(submit_request(engine, key, idempotency_key=f"bench-{run}-{i}", identifiers=[("email", emails[i % len(emails)])],
                                        samples=[], actor="bench").request_id)
        processing.start_processing(request_id)
        return request_id

    modes = {}
    with use_settings(settings):
        counter = 0
        for mode, max_bytes in (("without_cache", 0), ("with_cache", DEFAULT_MAX_MB << 20)):
            ARTEFACTS.clear()
            ARTEFACTS.max_bytes = max_bytes
            seconds, cpu_seconds = [], []
            for _ in range(args.requests + 1 if max_bytes or not args.skip_uncached else 0):
                request_id = new_request(counter)
                counter += 1
                t, c = time.perf_counter(), time.process_time()
                result = processing.locate_and_record(request_id, "bench")
                seconds.append(time.perf_counter() - t)
                cpu_seconds.append(time.process_time() - c)
                assert result["located"], result
            if seconds:
                # CPU seconds beside wall: on a shared 2-core machine the wall time also holds the waits
                modes[mode] = {"first_s": round(seconds[0], 4), **_quantiles(seconds[1:]),
                               "cpu": _quantiles(cpu_seconds[1:])}
        modes["with_cache"]["cache_bytes_estimated"] = ARTEFACTS.bytes
        ARTEFACTS.max_bytes = DEFAULT_MAX_MB << 20
    engine.dispose()
    figures.update(modes)
    figures["cold_first_request_s"] = modes["with_cache"]["first_s"]
    figures["p95_goal_ms"], figures["p95_goal_met"] = 50, modes["with_cache"]["p95_ms"] <= 50
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    if "without_cache" in modes:
        figures["speedup_p50"] = round(modes["without_cache"]["p50_ms"] / modes["with_cache"]["p50_ms"], 2)
        figures["speedup_p95"] = round(modes["without_cache"]["p95_ms"] / modes["with_cache"]["p95_ms"], 2)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default="100000", help="one size or a comma-separated list (scaling)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per mode, after the first")
    parser.add_argument("--embedder", default="hashing")
    parser.add_argument("--home", type=Path, default=None, help="where the temporary data homes go")
    parser.add_argument("--skip-uncached", action="store_true", help="time only the cached path (the goal)")
    parser.add_argument("--keep-home", type=Path, default=None,
                        help="build each size's data once under this folder and reuse it in later runs (SQLite only)")
    parser.add_argument("--database-url", default=None, help="default: SQLite in each home; "
                        "postgresql+psycopg://...: a fresh database per size is created on that server")
    args = parser.parse_args(argv)
    if args.keep_home and args.database_url:
        parser.error("--keep-home reuses SQLite homes; with --database-url each run builds its own database")
    sizes = [int(s) for s in args.records.split(",")]
    runs = [run_size(n, args) for n in sizes]
    print(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

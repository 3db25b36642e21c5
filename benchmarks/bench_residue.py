"""The residue check on a demo request: generate N demo records, ingest them (hashing
embedder), train the SISA ensemble, erase the demo subject (the whole ``erasure demo``
story, flows on a temporary Prefect server, SQLite in a temporary data home), then time
``check_residue`` (files, every live shard version's texts screened against the request's
tombstones, the database, Prefect's records) and an idle ``erasure gc`` sweep. Prints one
JSON document.

    .venv/bin/python benchmarks/bench_residue.py --records 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--home", type=Path, default=None, help="data home (default: a temporary folder)")
    args = parser.parse_args()

    home = (args.home or Path(tempfile.mkdtemp(prefix="bench-residue-"))).resolve()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.pop("PREFECT_API_URL", None)  # a temporary server, as `erasure demo` uses without one
    (home / "prefect").mkdir(parents=True, exist_ok=True)

    import flows.prefect_setup  # noqa: F401  (our Prefect defaults before Prefect is imported)
    from api.demo import run_full_demo
    from db.settings import Settings, use_settings
    from flows.prefect_records import request_run_records
    from pipeline.database import open_database
    from pipeline.gc import sweep
    from pipeline.progress import SilentReporter
    from pipeline.residue import check_residue

    settings = Settings(home=home, secret_key="bench-residue-secret-key-0123456789abcdef")
    started = time.perf_counter()
    demo = run_full_demo(settings, records=args.records, shards=args.shards, slices=args.slices,
                         reporter=SilentReporter(), embedder="hashing", epochs=args.epochs)
    demo_s = time.perf_counter() - started
    request_id = demo["request_id"]
    with use_settings(settings):
        engine = open_database(settings)
        try:
            t = time.perf_counter()
            report = check_residue(settings, engine, request_id, prefect_records=request_run_records)
            residue_s = time.perf_counter() - t
            t = time.perf_counter()
            gc = sweep(settings, engine).to_dict()
            gc_s = time.perf_counter() - t
        finally:
            engine.dispose()
    print(json.dumps({
        "benchmark": "residue",
        "records": args.records, "shards": args.shards, "slices": args.slices, "embedder": "hashing",
        "database": "sqlite",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "request": {"id": request_id, "state": demo["state"], "erased": demo["erased"]},
        "demo_seconds": round(demo_s, 1),
        "residue_in_demo": demo["accountability"].get("residue", {}).get("summary"),
        "residue": {"seconds": round(residue_s, 2), "clean": report["clean"], "complete": report["complete"],
                    "summary": report["summary"], "files": report["inventory"]["files"],
                    "versions_screened": report["shards"]["versions_screened"],
                    "records_screened": report["shards"]["records_screened"],
                    "tombstones": report["tombstones"], "prefect": {k: report["prefect"].get(k) for k in
                                                                    ("status", "flow_runs", "records_read", "reason")},
                    "sqlite_wal": report["database"]["sqlite_wal"],
                    "upstream": [{"rows": len(a["rows"]), "open": a["open"]} for a in report["upstream"]]},
        "idle_sweep": {"seconds": round(gc_s, 2), "removed": gc["removed"], "errors": len(gc["errors"]),
                       "database": gc["database"]},
        "home": str(home),
    }, indent=2))


if __name__ == "__main__":
    main()

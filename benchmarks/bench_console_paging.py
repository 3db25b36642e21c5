"""The console's requests table at scale: keyset paging against the OFFSET baseline.

    .venv/bin/python benchmarks/bench_console_paging.py --requests 100000          # PostgreSQL, ~1 min
    .venv/bin/python benchmarks/bench_console_paging.py --requests 20000 --sqlite  # a quick look

N synthetic erasure requests (states spread over the state machine, received over the
last year, so deadlines from overdue to a month ahead; one recorded match per request
on average) are bulk-inserted into a fresh database brought to head and ANALYZEd. Then each page
query of ``db.console_queries.request_page`` runs ``--runs`` times: the first page of
all requests, a page 90% of the way through (reached by its cursor), and the open
requests due within 7 days; the baseline reads the same deep page with OFFSET, as a
naive table would. Figures: median milliseconds. Prints one JSON document on stdout
(``deep_page_speedup_vs_offset``: OFFSET's median over keyset's); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, literal, select, text, tuple_  # noqa: E402

from db.console_queries import encode_cursor, request_page  # noqa: E402
from db.models import Dataset, UTCDateTime  # noqa: E402
from db.requests import ErasureRequest  # noqa: E402
from db.session import make_engine, unit_of_work, upgrade_to_head  # noqa: E402
from db.training import RequestMatch  # noqa: E402
from pipeline.lifecycle import OPEN_STATES, RequestState, due_date  # noqa: E402

PAGE = 50


def _fill(engine, n: int, seed: int = 0) -> None:  # noqa: ANN001
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    states = [s.value for s in RequestState]
    with unit_of_work(engine) as session:
        dataset = Dataset(name="bench", seed=0, n_shards=8, n_slices=4, feature_dim=8, embedder="hashing", key_id="k")
        session.add(dataset)
        session.flush()
        dataset_id = dataset.id
    done = 0
    while done < n:
        batch = min(5000, n - done)
        rows, matches = [], []
        for i in range(done, done + batch):
            received = now - timedelta(seconds=rng.uniform(0, 365 * 86400))
            rid = str(uuid.UUID(int=rng.getrandbits(128)))
            rows.append({"id": rid, "idempotency_key": f"bench-{i}", "body_fingerprint": "0" * 64,
                         "state": rng.choice(states), "received_at": received, "original_due_at": due_date(received),
                         "due_at": due_date(received), "extension_months": 0, "submitted_by": "bench",
                         "identifier_count": 1, "sample_count": 0, "updated_at": received})
            for j in range(rng.choice((0, 1, 1, 2))):
                matches.append({"request_id": rid, "dataset_id": dataset_id, "match_ref": f"0/r{i}-{j}", "shard": 0,
                                "shard_version": 1, "slice": 0, "record_id": f"r{i}-{j}",
                                "method": rng.choice(("identifier", "minhash", "embedding")), "metric": "jaccard",
                                "score": 0.9, "decision": "erase", "hop": 0, "query": "sample:1", "found_at": received})
        with unit_of_work(engine) as session:
            session.execute(insert(ErasureRequest), rows)
            if matches:
                session.execute(insert(RequestMatch), matches)
        done += batch
        print(f"inserted {done:,}/{n:,} requests", file=sys.stderr)


def _median_ms(fn, runs: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="an admin URL: a fresh database is created and dropped on it")
    args = parser.parse_args()
    if args.requests < 1000 or args.runs < 1:
        parser.error("--requests must be at least 1000 and --runs at least 1")

    folder = tempfile.TemporaryDirectory(prefix="bench-console-")
    admin = None
    if args.sqlite:
        url = f"sqlite:///{Path(folder.name) / 'bench.db'}"
    else:
        import psycopg

        name = f"bench_console_{uuid.uuid4().hex[:10]}"
        libpq = args.postgres_url.replace("postgresql+psycopg://", "postgresql://")
        admin = psycopg.connect(libpq, autocommit=True)
        admin.execute(f'CREATE DATABASE "{name}"')
        url = args.postgres_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade_to_head(url)
        engine = make_engine(url)
        _fill(engine, args.requests)
        with engine.connect() as connection:  # statistics, as autovacuum would have them on a live database
            connection.execute(text("ANALYZE"))
            connection.commit()
        with unit_of_work(engine) as session:
            ordered = session.execute(select(ErasureRequest.due_at, ErasureRequest.id)
                                      .order_by(ErasureRequest.due_at, ErasureRequest.id)).all()
        deep_at = int(len(ordered) * 0.9)
        cursor = encode_cursor(*ordered[deep_at - 1])

        def page(**kwargs):  # noqa: ANN003, ANN202
            with unit_of_work(engine) as session:
                return request_page(session, limit=PAGE, **kwargs)

        def offset_page() -> list:
            with unit_of_work(engine) as session:
                return session.execute(select(ErasureRequest.id).order_by(ErasureRequest.due_at, ErasureRequest.id)
                                       .offset(deep_at).limit(PAGE)).all()

        due_at, last_id = ordered[deep_at - 1]

        def keyset_page() -> list:  # the same rows as offset_page, found by the index from the cursor
            with unit_of_work(engine) as session:
                return session.execute(select(ErasureRequest.id).where(
                    tuple_(ErasureRequest.due_at, ErasureRequest.id) > tuple_(literal(due_at, UTCDateTime()),
                                                                            literal(last_id)))
                    .order_by(ErasureRequest.due_at, ErasureRequest.id).limit(PAGE)).all()

        assert [r.id for r in page(states=None, after=cursor).rows] == [r[0] for r in offset_page()] \
            == [r[0] for r in keyset_page()]
        first = _median_ms(lambda: page(states=None), args.runs)
        deep = _median_ms(lambda: page(states=None, after=cursor), args.runs)
        soon = _median_ms(lambda: page(states=OPEN_STATES, due="week"), args.runs)
        baseline = _median_ms(offset_page, args.runs)
        keyset = _median_ms(keyset_page, args.runs)
        engine.dispose()
        print(json.dumps({
            "benchmark": "console_paging", "backend": "sqlite" if args.sqlite else "postgresql",
            "requests": args.requests, "page_size": PAGE, "runs": args.runs,
            "first_page_ms": first, "deep_page_ms": deep, "open_due_within_7_days_ms": soon,
            "deep_page_rows_keyset_ms": keyset, "baseline_deep_page_rows_offset_ms": baseline,
            "deep_page_speedup_vs_offset": round(baseline / keyset, 2) if keyset else None,
            "note": "*_page_ms: the whole request_page (rows, total count, per-method match counts); "
                    "the speedup compares the row query alone, keyset vs OFFSET, for the page 90% in",
        }, indent=2))
    finally:
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()
        folder.cleanup()


if __name__ == "__main__":
    main()

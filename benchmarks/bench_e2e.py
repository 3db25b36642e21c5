"""End-to-end seconds of one erasure request, from submission to completed, split by step.

Generates the demo data, ingests and trains it (reported, not part of the
request's time), submits a request for the demo person with the most planted
copies, and processes it with the flow (review decisions by policy: erase).
Step times come from the request's own timeline (state changes are recorded
with their time), so they are what an auditor would see.

    .venv/bin/python benchmarks/bench_e2e.py --records 100000            # SQLite, temporary Prefect server
    .venv/bin/python benchmarks/bench_e2e.py --records 2000 --database-url postgresql+psycopg://postgres@127.0.0.1/bench

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--embedder", default="hashing")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: a temporary directory)")
    parser.add_argument("--database-url", default=None, help="default: SQLite in the home")
    args = parser.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    (home / "prefect").mkdir(parents=True, exist_ok=True)

    from db.session import unit_of_work
    from db.settings import Settings
    from pipeline.database import open_database
    from api.demo import DEMO_FIELDS, pick_demo_subject
    from flows.process_request import process_erasure_request
    from pipeline.lifecycle import get_request, submit_request
    from db.settings import use_settings
    from flows.training import ingest_dataset, train_ensemble
    from shards.demo_data import write_demo

    settings = Settings(home=home, database_url=args.database_url,
                        secret_key=os.environ.get("ERASURE_SECRET_KEY") or "bench-secret-key-0123456789abcdef")
    figures: dict = {"records": args.records, "shards": args.shards, "slices": args.slices, "epochs": args.epochs,
                     "database": settings.resolved_database_url.split(":", 1)[0].split("+")[0]}
    t = time.perf_counter()
    files = write_demo(home / "demo-data", args.records, seed=0)
    figures["generate_s"] = round(time.perf_counter() - t, 3)
    subject = pick_demo_subject(files.ground_truth)
    with use_settings(settings):
        t = time.perf_counter()
        ingest_dataset(str(files.records), "demo", identifier_fields=[list(p) for p in DEMO_FIELDS.identifier_fields],
                       shards=args.shards, slices=args.slices, embedder=args.embedder)
        figures["ingest_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        train_ensemble("demo", epochs=args.epochs)
        figures["train_s"] = round(time.perf_counter() - t, 3)

        engine = open_database(settings)
        t = time.perf_counter()
        request_id = submit_request(engine, settings.secret_key_bytes(), idempotency_key="bench",
                                    identifiers=[("email", subject["email"])], samples=[], actor="bench").request_id
        summary = process_erasure_request(request_id, "demo", review_timeout_s=0, on_review_timeout="erase")
        figures["submit_to_completed_wall_s"] = round(time.perf_counter() - t, 3)
        with unit_of_work(engine) as session:
            request = get_request(session, request_id)
            events = [(e.at, e.to_state) for e in request.events if e.action in ("submitted", "transition")]
        engine.dispose()

    steps: dict[str, float] = {}
    for (start, state), (end, _) in zip(events, events[1:]):
        steps[state] = round(steps.get(state, 0.0) + (end - start).total_seconds(), 3)
    figures.update(
        state=summary["state"],
        submit_to_completed_s=round((events[-1][0] - events[0][0]).total_seconds(), 3),
        seconds_in_state=steps,
        matches=summary["matches"], erased=summary["erased"], review=summary["review"],
        shards_retrained=len(summary["retraining"]),
        retraining=[{k: j[k] for k in ("shard", "retrained_from_slice", "samples_processed", "full_shard_samples",
                                       "fraction_of_shard", "seconds")} for j in summary["retraining"]],
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

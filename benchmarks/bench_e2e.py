"""End-to-end seconds of one erasure request, from submission to completed, split by step.

Generates the demo data, ingests and trains it (reported, not part of the
request's time), submits a request for the demo person with the most planted
copies, and processes it with the flow (review decisions by policy: erase).
Step times come from the request's own timeline (state changes are recorded
with their time), so they are what an auditor would see.

    .venv/bin/python benchmarks/bench_e2e.py --records 100000            # both placements, SQLite, temporary Prefect server
    .venv/bin/python benchmarks/bench_e2e.py --records 2000 --placement subject --database-url postgresql+psycopg://postgres@127.0.0.1/bench

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
    parser.add_argument("--placement", default="subject,record",
                        help="comma-separated placements, each in its own data home (default: both)")
    parser.add_argument("--home", type=Path, default=None, help="data home root (default: a temporary directory)")
    parser.add_argument("--database-url", default=None, help="default: SQLite in each home")
    args = parser.parse_args(argv)
    placements = [p.strip() for p in args.placement.split(",") if p.strip()]
    if not placements or any(p not in ("subject", "record") for p in placements):
        parser.error(f"--placement takes subject and/or record, got {args.placement!r}")
    if args.database_url and len(placements) > 1:
        parser.error("--database-url holds one dataset: pass one --placement with it")

    root = args.home or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    (root / "prefect").mkdir(parents=True, exist_ok=True)

    from api.demo import pick_demo_subject
    from shards.demo_data import write_demo

    figures: dict = {"benchmark": "e2e", "records": args.records, "shards": args.shards, "slices": args.slices,
                     "epochs": args.epochs}
    t = time.perf_counter()
    files = write_demo(root / "demo-data", args.records, seed=0)
    figures["generate_s"] = round(time.perf_counter() - t, 3)
    persons = {"typical": typical_person(files.ground_truth), "most_copies": pick_demo_subject(files.ground_truth)}
    figures["persons"] = {name: {"originals": len(p["originals"]), "copies": len(p["copies"])}
                          for name, p in persons.items()}
    figures["placements"] = {p: erase_one(root / p, p, files, persons, args) for p in placements}
    if len(placements) == 2:
        by = figures["placements"]
        figures["record_over_subject"] = {
            name: {key: round(by["record"][name][key] / by["subject"][name][key], 2) if by["subject"][name][key]
                   else None for key in ("submit_to_completed_wall_s", "retrain_samples")}
            for name in persons}
    print(json.dumps(figures, indent=2))
    return 0


def typical_person(ground_truth) -> dict:  # noqa: ANN001
    """A person as most requests come: no planted copies, the median number of records among those with 3-40."""
    rows = [json.loads(line) for line in Path(ground_truth).read_text().splitlines()]
    persons = sorted((r for r in rows if r["type"] == "person" and not r["copies"] and 3 <= len(r["originals"]) <= 40),
                     key=lambda p: (len(p["originals"]), p["person"]))
    if not persons:
        raise SystemExit("no person with 3-40 records and no copies in the demo data: use more --records")
    return persons[len(persons) // 2]


def erase_one(home: Path, placement: str, files, persons: dict[str, dict], args) -> dict:
    """Ingest and train under ``placement`` in ``home``, then one request per person, each from submission to
    completed (in turn: the second runs on the data the first left)."""
    from api.demo import DEMO_FIELDS
    from db.settings import Settings, use_settings
    from flows.training import ingest_dataset, train_ensemble
    from pipeline.database import open_database

    home.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=home, database_url=args.database_url,
                        secret_key=os.environ.get("ERASURE_SECRET_KEY") or "bench-secret-key-0123456789abcdef")
    figures: dict = {"placement": placement,
                     "database": settings.resolved_database_url.split(":", 1)[0].split("+")[0]}
    with use_settings(settings):
        t = time.perf_counter()
        ingest_dataset(str(files.records), "demo", identifier_fields=[list(p) for p in DEMO_FIELDS.identifier_fields],
                       shards=args.shards, slices=args.slices, embedder=args.embedder, placement=placement)
        figures["ingest_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        train_ensemble("demo", epochs=args.epochs)
        figures["train_s"] = round(time.perf_counter() - t, 3)

        engine = open_database(settings)
        for name, person in persons.items():
            figures[name] = erase_person(engine, settings, person, name)
        engine.dispose()
    return figures


def erase_person(engine, settings, person: dict, name: str) -> dict:  # noqa: ANN001
    from db.session import unit_of_work
    from flows.process_request import process_erasure_request
    from pipeline.lifecycle import get_request, submit_request

    figures: dict = {}
    t = time.perf_counter()
    request_id = submit_request(engine, settings.secret_key_bytes(), idempotency_key=f"bench-{name}",
                                identifiers=[("email", person["email"])], samples=[], actor="bench").request_id
    summary = process_erasure_request(request_id, "demo", review_timeout_s=0, on_review_timeout="erase")
    figures["submit_to_completed_wall_s"] = round(time.perf_counter() - t, 3)
    with unit_of_work(engine) as session:
        request = get_request(session, request_id)
        events = [(e.at, e.to_state) for e in request.events if e.action in ("submitted", "transition")]
    steps: dict[str, float] = {}
    for (start, state), (end, _) in zip(events, events[1:]):
        steps[state] = round(steps.get(state, 0.0) + (end - start).total_seconds(), 3)
    retraining = [{k: j[k] for k in ("shard", "retrained_from_slice", "samples_processed", "full_shard_samples",
                                     "fraction_of_shard", "seconds")} for j in summary["retraining"]]
    figures.update(
        state=summary["state"],
        submit_to_completed_s=round((events[-1][0] - events[0][0]).total_seconds(), 3),
        seconds_in_state=steps,
        matches=summary["matches"], erased=summary["erased"], review=summary["review"],
        shards_retrained=len(retraining),
        retrain_samples=sum(j["samples_processed"] for j in retraining),
        retraining=retraining,
    )
    return figures


if __name__ == "__main__":
    raise SystemExit(main())

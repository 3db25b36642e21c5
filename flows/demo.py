"""The demo: generate the built-in demo dataset and ingest it.

Later stages (locate, erase, retrain, certify) extend this as they land."""

from __future__ import annotations

from db.settings import Settings
from flows.ingest import IngestOptions, ingest_source_file
from flows.progress import Reporter
from shards.demo_data import write_demo
from shards.sources import FieldMap

DEMO_FIELDS = FieldMap(
    id_field="id",
    text_field="text",
    label_field="label",
    identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")),
)


def run_demo(
    settings: Settings, *, records: int, shards: int, slices: int, reporter: Reporter, embedder: str = "minilm"
) -> dict:
    demo_dir = settings.home / "demo" / f"n{records}"
    files = write_demo(demo_dir, records, seed=0)
    summary = ingest_source_file(
        files.records,
        IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=shards, n_slices=slices, embedder=embedder),
        settings,
        reporter,
    )
    return {
        "demo_data": {"records": str(files.records), "ground_truth": str(files.ground_truth),
                      "n_records": files.n_records, "n_persons": files.n_persons, "n_copies": files.n_copies},
        "ingest": summary.to_json(),
        "database": settings.resolved_database_url.split("@")[-1],
        "home": str(settings.home),
    }

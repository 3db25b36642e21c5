"""Read-only reports over the lineage, for the CLI and the API."""

from __future__ import annotations

from db.lineage import get_dataset, latest_shard_versions
from db.session import unit_of_work
from db.settings import Settings
from pipeline.database import open_database


def shard_report(settings: Settings, dataset_name: str) -> dict:
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        dataset = get_dataset(session, dataset_name)
        if dataset is None:
            raise LookupError(f"no dataset named {dataset_name!r}; ingest a file first")
        versions = latest_shard_versions(session, dataset.id)
        return {
            "dataset": dataset.name,
            "shards_configured": dataset.n_shards,
            "slices": dataset.n_slices,
            "shards": [
                {"shard": s, "version": v.version, "row_count": v.row_count, "sha256": v.sha256,
                 "path": v.path, "created_by": v.created_by}
                for s, v in sorted(versions.items())
            ],
        }

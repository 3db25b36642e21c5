"""Ingest and training as Prefect flows.

``train_ensemble`` trains one SISA sub-model per shard (R slices, a checkpoint
after each, resuming from checkpoints already stored for the same data), then
publishes the new ensemble version (``pipeline/training.py`` records the lineage).
"""

from __future__ import annotations

import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

from pathlib import Path

from prefect import flow, task

from db.settings import load_settings
from flows.retries import RETRY
from pipeline.training import (
    TrainingOptions,
    list_shards,
    publish_trained_members,
    train_baseline,
    train_one_shard,
)


@task(name="train-shard", result_serializer="json", **RETRY)
def train_shard_task(dataset: str, shard: int, options: dict) -> dict:
    """Train (or resume) one shard's sub-model on its latest version."""
    return train_one_shard(load_settings(), dataset, shard, options)


@task(name="publish-ensemble", result_serializer="json", **RETRY)
def publish_ensemble_task(dataset: str, members: list[dict]) -> dict:
    return publish_trained_members(load_settings(), dataset, members)


@task(name="train-baseline", result_serializer="json", **RETRY)
def train_baseline_task(dataset: str, options: dict) -> dict:
    """One monolithic model on every live record, for comparison (never part of the ensemble)."""
    return train_baseline(load_settings(), dataset, options)


@flow(name="train-ensemble", log_prints=False)
def train_ensemble(dataset: str, epochs: float = 4.0, hidden: list[int] | None = None, batch_size: int = 128,
                   learning_rate: float = 2e-3, seed: int = 0, num_classes: int | None = None,
                   budget: str = "par", schedule: str = "equal-samples", baseline: bool = False,
                   family: str = "mlp", block_size: int = 256) -> dict:
    """Train every shard's sub-model (resuming from stored checkpoints), then publish the ensemble;
    with ``baseline``, also one monolithic model under the same options (``pipeline.training.TrainingOptions``)."""
    options = TrainingOptions(epochs=epochs, hidden=tuple(hidden or [64]), batch_size=batch_size,
                              learning_rate=learning_rate, seed=seed, num_classes=num_classes, budget=budget,
                              schedule=schedule, family=family, block_size=block_size).to_flow()  # bad options fail here, before any training
    shards = list_shards(load_settings(), dataset)
    members = [train_shard_task(dataset, shard, options) for shard in shards]
    published = publish_ensemble_task(dataset, members)
    result = {"dataset": dataset, "shards": members, **published}
    if baseline:
        result["baseline"] = train_baseline_task(dataset, options)
    return result


@flow(name="ingest-dataset")
def ingest_dataset(path: str, dataset: str, id_field: str = "id", text_field: str = "text",
                   label_field: str | None = "label", identifier_fields: list[list[str]] | None = None,
                   shards: int = 4, slices: int = 4, seed: int = 0, fmt: str | None = None,
                   embedder: str = "hashing", allow_new_labels: bool = False,
                   placement: str | None = None) -> dict:
    """Validate and ingest one source file (screened against earlier erasures' tombstones);
    records lineage source file -> records -> shard versions."""
    from pipeline.ingest import IngestOptions, ingest_source_file
    from shards.sources import FieldMap

    fields = FieldMap(id_field=id_field, text_field=text_field, label_field=label_field,
                      identifier_fields=tuple(tuple(pair) for pair in (identifier_fields or [])))
    options = IngestOptions(dataset=dataset, fields=fields, n_shards=shards, n_slices=slices, seed=seed, fmt=fmt,
                            embedder=embedder, allow_new_labels=allow_new_labels, placement=placement)
    summary = ingest_source_file(Path(path), options, load_settings())
    data = summary.to_json()
    data.pop("screened", None)  # counts only in a flow's result
    return data

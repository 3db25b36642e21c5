"""Ingest and training as Prefect flows, and the training lineage they record.

``train_ensemble`` trains one SISA sub-model per shard (R slices, a checkpoint
after each, resuming from checkpoints already stored for the same data), then
records checkpoint -> shard version and slice, and the new ensemble version ->
its member checkpoints. Checkpoints live under ``$ERASURE_HOME/checkpoints/
<dataset>``, ensemble manifests under ``$ERASURE_HOME/ensembles/<dataset>``.

Sub-models train one after another in the flow's process: torch's deterministic
switches are process-wide (see ``shards.device``), so two trainings must never
share a process concurrently.
"""

from __future__ import annotations

import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.lineage import latest_shard_versions
from db.models import utcnow
from db.audit import append_event
from db.session import unit_of_work
from db.settings import Settings, load_settings
from db.training import Checkpoint, EnsembleMemberRow, EnsembleVersionRow
from flows.database import open_database
from db.locks import lock_dataset
from flows.erasure import dataset_or_fail
from shards.checkpoints import CheckpointStore
from shards.ensemble import EnsembleMember, EnsembleVersion
from shards.model import ModelSpec
from shards.training import EmptyShardError, SliceSchedule, TrainConfig, checkpoint_chain, shard_from_parquet, train_shard

TRANSIENT_RETRIES = 3


def transient_fault(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry only what may pass: lost database connections, timeouts, I/O hiccups."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        state.result()
    except (OperationalError, TimeoutError, ConnectionError):
        return True
    except DBAPIError as exc:
        return bool(exc.connection_invalidated)
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: fail now, no retry
        return False
    return False


# Our database says what is done, so no Prefect caching: within one run a task
# called twice with the same inputs (e.g. re-reading review decisions) must run twice.
RETRY = dict(retries=TRANSIENT_RETRIES, retry_delay_seconds=[1, 4, 15], retry_condition_fn=transient_fault,
             cache_policy=NO_CACHE, persist_result=False)


@dataclass(frozen=True)
class TrainingOptions:
    """What determines the sub-models besides their data (part of every checkpoint address)."""

    epochs: float = 4.0
    hidden: tuple[int, ...] = (64,)
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    num_classes: int | None = None  # default: the dataset's highest label + 1


def checkpoint_store(settings: Settings, dataset: str) -> CheckpointStore:
    return CheckpointStore(settings.home / "checkpoints" / dataset)


def manifest_path(settings: Settings, dataset: str, version_id: str) -> Path:
    return settings.home / "ensembles" / dataset / f"{version_id}.json"


def current_ensemble_row(session: Session, dataset_id: int) -> EnsembleVersionRow | None:
    """The ensemble version in service: the dataset's newest."""
    return session.scalars(
        select(EnsembleVersionRow).where(EnsembleVersionRow.dataset_id == dataset_id)
        .order_by(EnsembleVersionRow.id.desc()).limit(1)
    ).first()


def current_ensemble(session: Session, dataset_id: int) -> EnsembleVersion | None:
    row = current_ensemble_row(session, dataset_id)
    return EnsembleVersion.read(row.manifest_path) if row is not None else None


def record_checkpoints(
    session: Session, store: CheckpointStore, dataset_id: int, shard: int, shard_version: int, keys: list[str]
) -> None:
    """Rows for the stored checkpoints of a chain that have none yet (a prefix
    shared with an earlier version keeps the version it was first trained for)."""
    for key in keys:
        if not store.exists(key) or session.get(Checkpoint, (dataset_id, key)) is not None:
            continue
        ref = store.ref(key)
        session.add(Checkpoint(
            dataset_id=dataset_id, key=key, shard=shard, slice=ref.slice_index, shard_version=shard_version,
            path=str(ref.path), sha256=ref.sha256, records_seen=ref.records_seen, created_at=utcnow(),
        ))
    session.flush()


def publish_ensemble(
    settings: Settings, session: Session, dataset_id: int, dataset: str, version: EnsembleVersion, created_by: str
) -> tuple[EnsembleVersion, bool]:
    """Record ``version`` as the ensemble in service (manifest file + rows), unless it
    is already the current one. Caller holds the dataset lock."""
    current = current_ensemble_row(session, dataset_id)
    if current is not None and current.version_id == version.version_id:
        return version, False
    if current is not None and version.parent is None:
        version = EnsembleVersion(version.members, version.aggregation, parent=current.version_id, notes=version.notes)
    path = version.write(manifest_path(settings, dataset, version.version_id))
    row = EnsembleVersionRow(
        dataset_id=dataset_id, version_id=version.version_id, parent_version_id=version.parent,
        manifest_path=str(path), created_by=created_by, created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    for member in version.members:
        session.add(EnsembleMemberRow(ensemble_id=row.id, shard=int(member.shard_id), dataset_id=dataset_id,
                                      checkpoint_key=member.checkpoint.key))
    session.flush()
    append_event(session, "ensemble.published", {
        "dataset": dataset, "version_id": version.version_id, "parent_version_id": version.parent,
        "members": {m.shard_id: m.checkpoint.key for m in version.members}, "created_by": created_by,
    }, actor=f"flow:{created_by.split(':')[0]}")
    return version, True


def _num_classes(settings: Settings, versions: dict, options: TrainingOptions) -> int:
    if options.num_classes is not None:
        return options.num_classes
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    highest = 1
    for v in versions.values():
        labels = pq.read_table(v.path, columns=["label"])["label"]
        top = pc.max(labels).as_py()
        if top is not None:
            highest = max(highest, int(top))
    return highest + 1


def train_config(feature_dim: int, num_classes: int, num_slices: int, options: TrainingOptions) -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(input_dim=feature_dim, num_classes=num_classes, hidden=options.hidden),
        schedule=SliceSchedule.paper(num_slices, options.epochs),
        batch_size=options.batch_size, learning_rate=options.learning_rate, seed=options.seed,
    )


# ---------------------------------------------------------------- tasks and flows


@task(name="train-shard", result_serializer="json", **RETRY)
def train_shard_task(dataset: str, shard: int, options: dict) -> dict:
    """Train (or resume) shard ``shard``'s sub-model on its latest version; record its checkpoints."""
    settings = load_settings()
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            ds = dataset_or_fail(session, dataset)
            versions = latest_shard_versions(session, ds.id)
            opts = TrainingOptions(**{**options, "hidden": tuple(options.get("hidden", (64,)))})
            config = train_config(ds.feature_dim, _num_classes(settings, versions, opts), ds.n_slices, opts)
            version = versions[shard]
            dataset_id = ds.id
        store = checkpoint_store(settings, dataset)
        data = shard_from_parquet(version.path, str(shard), unlabeled="skip")
        try:
            result = train_shard(data, config, store)
        except EmptyShardError:
            return {"shard": shard, "shard_version": version.version, "checkpoint": None, "trained_slices": []}
        with unit_of_work(engine) as session:
            record_checkpoints(session, store, dataset_id, shard, version.version, checkpoint_chain(data, config))
        return {
            "shard": shard, "shard_version": version.version, "checkpoint": result.final.key,
            "trained_slices": list(result.cost.slices_trained), "samples": result.cost.samples_processed,
            "seconds": round(result.cost.wall_seconds, 3),
        }
    finally:
        engine.dispose()


@task(name="publish-ensemble", result_serializer="json", **RETRY)
def publish_ensemble_task(dataset: str, members: list[dict]) -> dict:
    settings = load_settings()
    engine = open_database(settings)
    store = checkpoint_store(settings, dataset)
    try:
        with unit_of_work(engine) as session:
            ds = dataset_or_fail(session, dataset)
            lock_dataset(session, ds.id)
            refs = [EnsembleMember(str(m["shard"]), store.ref(m["checkpoint"])) for m in members if m["checkpoint"]]
            version, created = publish_ensemble(settings, session, ds.id, dataset, EnsembleVersion(tuple(refs)),
                                                created_by="train")
            return {"ensemble_version": version.version_id, "created": created, "members": len(refs)}
    finally:
        engine.dispose()


@flow(name="train-ensemble", log_prints=False)
def train_ensemble(dataset: str, epochs: float = 4.0, hidden: list[int] | None = None, batch_size: int = 128,
                   learning_rate: float = 2e-3, seed: int = 0, num_classes: int | None = None) -> dict:
    """Train every shard's sub-model (resuming from stored checkpoints), then publish the ensemble."""
    options = {"epochs": epochs, "hidden": list(hidden or [64]), "batch_size": batch_size,
               "learning_rate": learning_rate, "seed": seed, "num_classes": num_classes}
    shards = list_shards(dataset)
    members = [train_shard_task(dataset, shard, options) for shard in shards]
    published = publish_ensemble_task(dataset, members)
    return {"dataset": dataset, "shards": members, **published}


def list_shards(dataset: str) -> list[int]:
    settings = load_settings()
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return sorted(latest_shard_versions(session, dataset_or_fail(session, dataset).id))
    finally:
        engine.dispose()


@flow(name="ingest-dataset")
def ingest_dataset(path: str, dataset: str, id_field: str = "id", text_field: str = "text",
                   label_field: str | None = "label", identifier_fields: list[list[str]] | None = None,
                   shards: int = 4, slices: int = 4, seed: int = 0, fmt: str | None = None,
                   embedder: str = "hashing") -> dict:
    """Validate and ingest one source file (screened against earlier erasures' tombstones);
    records lineage source file -> records -> shard versions."""
    from flows.ingest import IngestOptions, ingest_source_file
    from shards.sources import FieldMap

    fields = FieldMap(id_field=id_field, text_field=text_field, label_field=label_field,
                      identifier_fields=tuple(tuple(pair) for pair in (identifier_fields or [])))
    options = dict(dataset=dataset, fields=fields, n_shards=shards, n_slices=slices, seed=seed, fmt=fmt)
    if "embedder" in IngestOptions.__dataclass_fields__:
        options["embedder"] = embedder
    summary = ingest_source_file(Path(path), IngestOptions(**options), load_settings())
    data = summary.to_json()
    data.pop("screened", None)  # counts only in a flow's result
    return data


class use_settings:
    """Point flows run in this process at ``settings`` (they read the environment,
    as a worker's flows do); the previous values come back afterwards."""

    NAMES = ("ERASURE_HOME", "ERASURE_DATABASE_URL", "ERASURE_SECRET_KEY", "ERASURE_SIGNING_KEY_FILE")

    def __init__(self, settings: Settings) -> None:
        import os

        self._os = os
        self.values = {
            "ERASURE_HOME": str(settings.home),
            "ERASURE_DATABASE_URL": settings.resolved_database_url,
            "ERASURE_SECRET_KEY": settings.secret_key.get_secret_value() if settings.secret_key else None,
            "ERASURE_SIGNING_KEY_FILE": str(settings.signing_key_file) if settings.signing_key_file else None,
        }
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> use_settings:
        for name, value in self.values.items():
            self.saved[name] = self._os.environ.get(name)
            if value is None:
                self._os.environ.pop(name, None)
            else:
                self._os.environ[name] = value
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if value is None:
                self._os.environ.pop(name, None)
            else:
                self._os.environ[name] = value

"""Training lineage: sub-model checkpoints -> shard version and slice, and the
ensemble version in service -> its member checkpoints.

Checkpoints live under ``$ERASURE_HOME/checkpoints/<dataset>``, ensemble
manifests under ``$ERASURE_HOME/ensembles/<dataset>``; with a storage URL
(``pipeline.object_store``) the rows name their uploaded objects and the home is this
host's cache of them. Sub-models train one after
another in the calling process: torch's deterministic switches are process-wide
(see ``shards.device``), so two trainings must never share a process concurrently.

Publishing re-checks under the shard locks. Training reads each shard's latest
version without holding its lock (a training takes minutes), so an erasure may
commit a newer version meanwhile. ``publish_trained_members`` takes every
shard's lock, then the dataset's, and publishes only if each member was trained
on its shard's latest version; a stale member is trained again on the latest
version (outside the locks) and the check repeats. No published ensemble has a
member that saw a record erased before the publishing transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.audit import append_event
from db.lineage import latest_shard_versions
from db.locks import lock_dataset, lock_shard
from db.models import utcnow
from db.session import unit_of_work
from db.settings import Settings
from db.training import Checkpoint, EnsembleMemberRow, EnsembleVersionRow
from pipeline.database import open_database
from pipeline.erasure import dataset_or_fail
from pipeline.labels import vocabulary
from pipeline.object_store import is_object_url, local_copy, object_store, publish_file, shard_file
from shards.checkpoints import CheckpointStore
from shards.ensemble import EnsembleMember, EnsembleVersion
from shards.model import ModelSpec
from shards.training import DEFAULT_SCHEDULE, SCHEDULE_KINDS, EmptyShardError, SliceSchedule, TrainConfig, checkpoint_chain, shard_for_config, shard_from_parquet, train_shard


BUDGETS = ("par", "per-shard")


@dataclass(frozen=True)
class TrainingOptions:
    """What determines the sub-models besides their data (part of every checkpoint address).

    ``budget="par"`` (the default) reads ``epochs`` as a single model's epochs over the whole
    dataset: each of the S sub-models runs ``epochs × S`` epochs' worth over its shard, so it
    makes as many gradient updates as that single model (the ensemble trains to par; training
    costs S times a single model, spread over S shards). ``"per-shard"``: ``epochs`` per
    sub-model, each gets 1/S of the updates (cheaper, less accurate). ``schedule`` spreads them
    over the slices (``shards.training.SCHEDULE_KINDS``): ``equal-samples`` makes retraining from
    a late slice cheap, ``paper`` is Bourtoule et al.'s equal epochs per slice. The budget is a
    function of the config and the dataset's fixed shard count only, never of its live size, so
    retraining reproduces it exactly.
    """

    epochs: float = 4.0
    hidden: tuple[int, ...] = (64,)
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    num_classes: int | None = None  # default: the dataset's label vocabulary size, or highest label + 1
    budget: str = "par"
    schedule: str = DEFAULT_SCHEDULE
    family: str = "mlp"  # a shards.families name; "lm" trains byte-level language models on the texts
    block_size: int = 256  # bytes of each text an lm reads (text families only)

    def __post_init__(self) -> None:
        from shards.families import family_named

        family_named(self.family)  # an unknown family fails here, naming the known ones
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.schedule not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_KINDS)}, got {self.schedule!r}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")

    def submodel_epochs(self, num_shards: int) -> float:
        """Epochs' worth of samples each sub-model processes over its shard."""
        return self.epochs * num_shards if self.budget == "par" else self.epochs

    def to_flow(self) -> dict:
        """The options as the train flow's JSON parameters."""
        return {"epochs": self.epochs, "hidden": list(self.hidden), "batch_size": self.batch_size,
                "learning_rate": self.learning_rate, "seed": self.seed, "num_classes": self.num_classes,
                "budget": self.budget, "schedule": self.schedule, "family": self.family,
                "block_size": self.block_size}


def checkpoint_store(settings: Settings, dataset: str) -> CheckpointStore:
    root = settings.home / "checkpoints" / dataset
    return CheckpointStore(root) if object_store(settings) is None else SharedCheckpointStore(root, settings, dataset)


class SharedCheckpointStore(CheckpointStore):
    """The checkpoints of a dataset with a storage URL: the home folder is this host's cache.
    A checkpoint the database records (and has not purged) exists; it is fetched from its
    object, verified against the row's sha256, on first use."""

    def __init__(self, root: Path, settings: Settings, dataset: str) -> None:
        super().__init__(root)
        self.settings, self.dataset = settings, dataset

    def _recorded(self, key: str) -> tuple[str, str] | None:
        from db.models import Dataset

        engine = open_database(self.settings)
        with unit_of_work(engine) as session:
            row = session.execute(
                select(Checkpoint.path, Checkpoint.sha256).join(Dataset, Dataset.id == Checkpoint.dataset_id)
                .where(Dataset.name == self.dataset, Checkpoint.key == key, Checkpoint.file_purged_at.is_(None))
            ).first()
        return (row.path, row.sha256) if row is not None and is_object_url(row.path) else None

    def _fetch(self, key: str) -> bool:
        if super().exists(key):
            return True
        recorded = self._recorded(key)
        if recorded is None:
            return False
        local_copy(self.settings, recorded[0], recorded[1], self.path_for(key))
        return True

    def exists(self, key: str) -> bool:
        return super().exists(key) or self._recorded(key) is not None

    def load(self, key_or_ref):  # noqa: ANN001, ANN201
        self._fetch(key_or_ref if isinstance(key_or_ref, str) else key_or_ref.key)
        return super().load(key_or_ref)

    def publish(self, path: Path, sha256: str) -> str:
        """Upload a checkpoint written here; the URL its row records."""
        return publish_file(self.settings, path, sha256)


def manifest_path(settings: Settings, dataset: str, version_id: str) -> Path:
    return settings.home / "ensembles" / dataset / f"{version_id}.json"


def read_manifest(settings: Settings, row: EnsembleVersionRow, dataset: str | None = None) -> EnsembleVersion:
    """The ensemble version a row names (fetched and verified first, with a storage URL)."""
    if not is_object_url(row.manifest_path):
        return EnsembleVersion.read(row.manifest_path)
    if dataset is None:
        from sqlalchemy.orm import object_session

        from db.models import Dataset

        dataset = object_session(row).get(Dataset, row.dataset_id).name
    return EnsembleVersion.read(local_copy(settings, row.manifest_path, None,
                                           manifest_path(settings, dataset, row.version_id)))


def current_ensemble_row(session: Session, dataset_id: int) -> EnsembleVersionRow | None:
    """The ensemble version in service: the dataset's newest."""
    return session.scalars(
        select(EnsembleVersionRow).where(EnsembleVersionRow.dataset_id == dataset_id)
        .order_by(EnsembleVersionRow.id.desc()).limit(1)
    ).first()


def current_ensemble(session: Session, dataset_id: int, settings: Settings | None = None) -> EnsembleVersion | None:
    row = current_ensemble_row(session, dataset_id)
    if row is None:
        return None
    if settings is None and is_object_url(row.manifest_path):
        raise RuntimeError("the ensemble's manifest is in the shared store: pass the settings")
    return EnsembleVersion.read(row.manifest_path) if settings is None else read_manifest(settings, row)


def record_checkpoints(
    session: Session, store: CheckpointStore, dataset_id: int, shard: int, shard_version: int, keys: list[str]
) -> None:
    """Rows for the stored checkpoints of a chain that have none yet (a prefix
    shared with an earlier version keeps the version it was first trained for)."""
    for key in keys:
        if not store.exists(key) or session.get(Checkpoint, (dataset_id, key)) is not None:
            continue
        ref = store.ref(key)
        path = store.publish(ref.path, ref.sha256) if isinstance(store, SharedCheckpointStore) else str(ref.path)
        session.add(Checkpoint(
            dataset_id=dataset_id, key=key, shard=shard, slice=ref.slice_index, shard_version=shard_version,
            path=path, sha256=ref.sha256, records_seen=ref.records_seen, created_at=utcnow(),
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
        manifest_path=publish_file(settings, path), created_by=created_by, created_at=utcnow(),
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


def _num_classes(settings: Settings, versions: dict, options: TrainingOptions, vocabulary_size: int = 0) -> int:
    """The option if given; for a dataset of class names, its vocabulary's size; else the highest label + 1."""
    if options.num_classes is not None:
        return options.num_classes
    if vocabulary_size:
        return vocabulary_size
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    highest = 1
    for v in versions.values():
        labels = pq.read_table(shard_file(settings, v), columns=["label"])["label"]
        top = pc.max(labels).as_py()
        if top is not None:
            highest = max(highest, int(top))
    return highest + 1


def train_config(feature_dim: int, num_classes: int, num_slices: int, options: TrainingOptions,
                 num_shards: int = 1) -> TrainConfig:
    """The sub-models' config: ``options`` on a dataset of ``num_shards`` shards of ``num_slices`` slices."""
    if options.family == "lm":
        from shards.lm import lm_spec

        spec = lm_spec(block_size=options.block_size, width=options.hidden[0], layers=len(options.hidden))
    else:
        spec = ModelSpec(input_dim=feature_dim, num_classes=num_classes, hidden=options.hidden, family=options.family)
    return TrainConfig(
        model=spec,
        schedule=SliceSchedule.named(options.schedule, num_slices, options.submodel_epochs(num_shards)),
        batch_size=options.batch_size, learning_rate=options.learning_rate, seed=options.seed,
    )




def _dataset_train_config(settings: Settings, session: Session, ds, options: dict, *, monolithic: bool) -> TrainConfig:  # noqa: ANN001
    """The training config of the dataset's sub-models (or of its one-slice monolithic baseline)."""
    versions = latest_shard_versions(session, ds.id)
    opts = TrainingOptions(**{**options, "hidden": tuple(options.get("hidden", (64,)))})
    classes = _num_classes(settings, versions, opts, len(vocabulary(session, ds.id)))
    if monolithic:
        return train_config(ds.feature_dim, classes, 1, opts, 1)
    return train_config(ds.feature_dim, classes, ds.n_slices, opts, ds.n_shards)


def train_one_shard(settings: Settings, dataset: str, shard: int, options: dict) -> dict:
    """Train (or resume) shard ``shard``'s sub-model on its latest version; record its checkpoints."""
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            ds = dataset_or_fail(session, dataset)
            config = _dataset_train_config(settings, session, ds, options, monolithic=False)
        return _train_latest(settings, engine, dataset, shard, config)
    finally:
        engine.dispose()


def _train_latest(settings: Settings, engine, dataset: str, shard: int, config: TrainConfig) -> dict:  # noqa: ANN001
    """Train (or resume) the shard's sub-model on its latest version under ``config``; record its checkpoints."""
    with unit_of_work(engine) as session:
        ds = dataset_or_fail(session, dataset)
        version = latest_shard_versions(session, ds.id)[shard]
        dataset_id = ds.id
    store = checkpoint_store(settings, dataset)
    data = shard_for_config(shard_file(settings, version, dataset), str(shard), config)
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


PUBLISH_ROUNDS = 5  # a shard superseded this many times while publishing: give up, say so


class PublishRaceError(RuntimeError):
    """The shards kept changing while publishing; nothing was published."""


def _members_config(store: CheckpointStore, members: list[dict]) -> TrainConfig:
    """The config the members were trained under (all share it: it is part of their addresses)."""
    for member in members:
        if member.get("checkpoint"):
            return TrainConfig.from_dict(store.load(member["checkpoint"])["config"])
    raise ValueError("no member has a checkpoint, so there is no training config to retrain a stale shard with; "
                     "run `erasure train` again")


def publish_trained_members(settings: Settings, dataset: str, members: list[dict]) -> dict:
    """Publish the ensemble of the freshly trained members, re-checked under the shard locks.

    Each member dict names its ``shard``, the ``shard_version`` it trained on and its final
    ``checkpoint`` (None for an empty shard), as ``train_one_shard`` returns. Under every
    shard's lock (then the dataset's), a member whose shard has a newer version (an erasure
    or ingest committed while it trained) is not published: it is trained again on the latest
    version, outside the locks, and the check repeats. ``retrained_stale`` lists those shards.
    """
    engine = open_database(settings)
    store = checkpoint_store(settings, dataset)
    members = [dict(m) for m in members]
    retrained: list[int] = []
    try:
        for _ in range(PUBLISH_ROUNDS):
            with unit_of_work(engine) as session:
                ds = dataset_or_fail(session, dataset)
                for shard in sorted({int(m["shard"]) for m in members}):  # one order everywhere: no deadlock
                    lock_shard(session, ds.id, shard)
                lock_dataset(session, ds.id)
                latest = latest_shard_versions(session, ds.id)
                stale = [i for i, m in enumerate(members) if m["shard_version"] != latest[int(m["shard"])].version]
                if not stale:
                    refs = [EnsembleMember(str(m["shard"]), store.ref(m["checkpoint"])) for m in members
                            if m["checkpoint"]]
                    version, created = publish_ensemble(settings, session, ds.id, dataset,
                                                        EnsembleVersion(tuple(refs)), created_by="train")
                    return {"ensemble_version": version.version_id, "created": created, "members": len(refs),
                            "retrained_stale": sorted(set(retrained))}
                append_event(session, "ensemble.publish_deferred", {
                    "dataset": dataset, "stale_shards": sorted(int(members[i]["shard"]) for i in stale),
                }, actor="flow:train")
            config = _members_config(store, members)
            for i in stale:
                shard = int(members[i]["shard"])
                members[i] = _train_latest(settings, engine, dataset, shard, config)
                retrained.append(shard)
        raise PublishRaceError(f"the shards of {dataset!r} changed {PUBLISH_ROUNDS} times while the ensemble was "
                               "being published; nothing was published: run `erasure train` again")
    finally:
        engine.dispose()


def list_shards(settings: Settings, dataset: str) -> list[int]:
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return sorted(latest_shard_versions(session, dataset_or_fail(session, dataset).id))
    finally:
        engine.dispose()


def baseline_shard_id() -> str:
    """The shard id a baseline's checkpoint chain is addressed under (never a real shard: those are numbers)."""
    return "baseline"


def train_baseline(settings: Settings, dataset: str, options: dict) -> dict:
    """One monolithic model (S=1, R=1) on every labelled live record of the latest shard versions,
    under the same options as the sub-models (under budget ``par`` its ``epochs`` are the ensemble's
    reference). Recorded in ``baseline_models`` with the shard versions it saw; never published."""
    import json

    import numpy as np

    from db.training import BaselineModel
    from shards.training import ShardData

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            ds = dataset_or_fail(session, dataset)
            versions = latest_shard_versions(session, ds.id)
            config = _dataset_train_config(settings, session, ds, options, monolithic=True)
            dataset_id = ds.id
        if config.model.family != "mlp":
            raise ValueError(f"a baseline is trained for the mlp family only, not {config.model.family!r}; "
                             "train without --baseline")
        parts = [shard_from_parquet(shard_file(settings, v, dataset), str(s), unlabeled="skip")
                 for s, v in sorted(versions.items())]
        parts = [p for p in parts if p.num_records]
        if not parts:
            raise ValueError(f"dataset {dataset!r} has no labelled records to train a baseline on")
        data = ShardData(
            baseline_shard_id(), [rid for p in parts for rid in p.record_ids],
            np.zeros(sum(p.num_records for p in parts), dtype=np.int32),
            np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]))
        store = checkpoint_store(settings, dataset)
        result = train_shard(data, config, store)
        trained_on = {str(s): v.version for s, v in sorted(versions.items())}
        with unit_of_work(engine) as session:
            for shard in sorted(versions):  # an erasure committed meanwhile: this baseline saw erased records
                lock_shard(session, dataset_id, shard)
            latest = {str(s): v.version for s, v in sorted(latest_shard_versions(session, dataset_id).items())}
            if latest != trained_on:
                result.final.path.unlink(missing_ok=True)
                raise PublishRaceError(f"the shards of {dataset!r} changed while the baseline was training; it "
                                       "was deleted, not recorded: run `erasure train --baseline` again")
            row = BaselineModel(dataset_id=dataset_id, checkpoint_key=result.final.key,
                                path=publish_file(settings, result.final.path, result.final.sha256),
                                sha256=result.final.sha256, records_seen=data.num_records,
                                config_digest=config.digest, shard_versions=json.dumps(trained_on, sort_keys=True),
                                created_at=utcnow())
            session.add(row)
            session.flush()
            append_event(session, "baseline.trained", {
                "dataset": dataset, "baseline_id": row.id, "checkpoint": result.final.key,
                "records_seen": data.num_records, "shard_versions": trained_on,
            }, actor="flow:train")
            baseline_id = row.id
        return {"baseline_id": baseline_id, "checkpoint": result.final.key, "records_seen": data.num_records,
                "samples": result.cost.samples_processed, "seconds": round(result.cost.wall_seconds, 3)}
    finally:
        engine.dispose()


def current_baseline(session: Session, dataset_id: int):  # noqa: ANN201 - db.training.BaselineModel | None
    """The dataset's newest baseline whose file was not purged (an erasure purges the baselines that saw it)."""
    from db.training import BaselineModel

    return session.scalars(select(BaselineModel).where(
        BaselineModel.dataset_id == dataset_id, BaselineModel.file_purged_at.is_(None))
        .order_by(BaselineModel.id.desc()).limit(1)).first()

"""OpenLineage RunEvents rebuilt from the lineage in our database.

``export_lineage`` reads what the pipeline recorded and writes one OpenLineage
``RunEvent`` per line (JSON lines): a START and a COMPLETE event for every run of
four jobs, in the job namespace ``erasure-pipeline``:

- ``ingest``  one source file -> the shard versions it created (inputs: the source
  file, by content hash, and each shard's previous version when the file appended);
- ``train``   an ensemble version's training: the shard versions its member
  checkpoints were trained on -> the ensemble version;
- ``erase``   one request's rewrite of one shard: old shard version -> new one, with
  the ``erasure_request`` run facet (request id, state, dates, counts);
- ``retrain`` one ``shard_retrain_jobs`` row: the shard version it trained on (and the
  ensemble it updated) -> the new ensemble version.

Datasets live in the namespace ``erasure://<dataset>``: shard versions are named
``shard-<s>/v<version>`` (facets: the Parquet columns, the version, the row count as
output statistics), ensemble versions ``ensemble/<version id>``, source files
``source/<sha256>`` (never their path: a path can name a person).

Nothing here is invented at export time: event times come from the database's
timestamps and every run id is a UUID5 of the job and the row it was rebuilt from,
so exporting twice gives byte-identical files. The events hold ids, versions and
counts only, never an identifier, a record id or a text.

Events are built with the ``openlineage-python`` client classes and written with its
``Serde``; the custom facet's JSON schema ships beside this module
(``pipeline/openlineage_facets/ErasureRequestRunFacet.json``).
"""

from __future__ import annotations

import io
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    RunFacet,
    dataset_version_dataset,
    output_statistics_output_dataset,
    schema_dataset,
)
from openlineage.client.serde import Serde
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Dataset, Record, ShardVersion, SourceFile
from db.requests import ErasureRequest, RequestEvent
from db.training import JOB_DONE, Checkpoint, EnsembleMemberRow, EnsembleVersionRow, RequestMatch, ShardRetrainJob
from shards.files import write_atomically
from shards.store import shard_schema

JOB_NAMESPACE = "erasure-pipeline"
JOBS = ("ingest", "train", "erase", "retrain")  # also the order of runs that share a start time
PROJECT_URL = "https://github.com/example-org/erasure-pipeline"
FACETS_DIR = Path(__file__).parent / "openlineage_facets"
ERASURE_REQUEST_FACET = "erasure_request"
ERASURE_REQUEST_FACET_SCHEMA = (
    f"{PROJECT_URL}/blob/main/pipeline/openlineage_facets/ErasureRequestRunFacet.json#/$defs/ErasureRequestRunFacet"
)
# run ids: uuid5(RUN_ID_NAMESPACE, "<job>/<dataset>/<row key>")
RUN_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, f"{PROJECT_URL}/openlineage/run")


def producer_url() -> str:
    """The producer of every event and facet: this project at its installed version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{PROJECT_URL}/tree/v{version('erasure-pipeline')}"
    except PackageNotFoundError:
        return PROJECT_URL


@attr.define
class ErasureRequestRunFacet(RunFacet):
    """The erasure request an ``erase`` run served (ids, states, dates, counts only)."""

    requestId: str  # noqa: N815 - OpenLineage facets use camelCase
    state: str
    receivedAt: str  # noqa: N815
    dueAt: str  # noqa: N815
    shard: int
    recordsErased: int  # noqa: N815
    requestRecordsErased: int  # noqa: N815
    matchesByMethod: dict[str, dict[str, int]]  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return ERASURE_REQUEST_FACET_SCHEMA


@dataclass(frozen=True)
class LineageRun:
    """One run rebuilt from the database: a START and a COMPLETE event."""

    job: str
    key: str  # the row it was rebuilt from, e.g. "source_file:3"
    dataset: str
    started_at: datetime
    completed_at: datetime
    inputs: tuple[InputDataset, ...]
    outputs: tuple[OutputDataset, ...]
    facets: tuple[tuple[str, RunFacet], ...] = ()

    @property
    def run_id(self) -> str:
        return str(uuid.uuid5(RUN_ID_NAMESPACE, f"{self.job}/{self.dataset}/{self.key}"))


# ---------------------------------------------------------------- helpers


def as_utc(moment: datetime) -> datetime:
    """Aware UTC; SQLite returns the plain ``DateTime`` columns naive (they hold UTC)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def event_time(moment: datetime) -> str:
    return as_utc(moment).isoformat(timespec="microseconds").replace("+00:00", "Z")


def dataset_namespace(dataset: str) -> str:
    return f"erasure://{dataset}"


def shard_version_name(shard: int, version: int) -> str:
    return f"shard-{shard}/v{version}"


def ensemble_name(version_id: str) -> str:
    return f"ensemble/{version_id}"


class _Builder:
    """Dataset entities of one export (the Parquet schema facet is built once per dataset)."""

    def __init__(self, producer: str) -> None:
        self.producer = producer
        self._schemas: dict[int, schema_dataset.SchemaDatasetFacet] = {}

    def _schema_facet(self, ds: Dataset) -> schema_dataset.SchemaDatasetFacet:
        if ds.id not in self._schemas:
            fields = [schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type))
                      for f in shard_schema(ds.feature_dim)]
            self._schemas[ds.id] = schema_dataset.SchemaDatasetFacet(fields=fields, producer=self.producer)
        return self._schemas[ds.id]

    def _shard_facets(self, ds: Dataset, version: ShardVersion) -> dict:
        return {
            "schema": self._schema_facet(ds),
            "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=str(version.version), producer=self.producer),
        }

    def shard_input(self, ds: Dataset, version: ShardVersion) -> InputDataset:
        return InputDataset(namespace=dataset_namespace(ds.name), name=shard_version_name(version.shard, version.version),
                            facets=self._shard_facets(ds, version))

    def shard_output(self, ds: Dataset, version: ShardVersion) -> OutputDataset:
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=int(version.row_count), producer=self.producer)
        return OutputDataset(namespace=dataset_namespace(ds.name), name=shard_version_name(version.shard, version.version),
                             facets=self._shard_facets(ds, version), outputFacets={"outputStatistics": stats})

    def _ensemble_facets(self, version_id: str) -> dict:
        return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=version_id,
                                                                               producer=self.producer)}

    def ensemble_input(self, ds: Dataset, version_id: str) -> InputDataset:
        return InputDataset(namespace=dataset_namespace(ds.name), name=ensemble_name(version_id),
                            facets=self._ensemble_facets(version_id))

    def ensemble_output(self, ds: Dataset, version_id: str) -> OutputDataset:
        return OutputDataset(namespace=dataset_namespace(ds.name), name=ensemble_name(version_id),
                             facets=self._ensemble_facets(version_id))

    def source_input(self, ds: Dataset, source: SourceFile) -> InputDataset:
        return InputDataset(namespace=dataset_namespace(ds.name), name=f"source/{source.sha256}", facets={
            "version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=source.sha256,
                                                                           producer=self.producer)})


# ---------------------------------------------------------------- runs per job


def _versions_by_shard(session: Session, ds: Dataset) -> dict[int, list[ShardVersion]]:
    by_shard: dict[int, list[ShardVersion]] = defaultdict(list)
    for row in session.scalars(select(ShardVersion).where(ShardVersion.dataset_id == ds.id)
                               .order_by(ShardVersion.shard, ShardVersion.version)):
        by_shard[row.shard].append(row)
    return by_shard


def _previous(versions: list[ShardVersion], version: ShardVersion) -> ShardVersion | None:
    earlier = [v for v in versions if v.version < version.version]
    return earlier[-1] if earlier else None


def ingest_runs(session: Session, ds: Dataset, build: _Builder, by_shard: dict[int, list[ShardVersion]]) -> list[LineageRun]:
    created: dict[str, list[ShardVersion]] = defaultdict(list)
    for versions in by_shard.values():
        for v in versions:
            created[v.created_by].append(v)
    runs = []
    for source in session.scalars(select(SourceFile).where(SourceFile.dataset_id == ds.id).order_by(SourceFile.id)):
        written = sorted(created.get(f"ingest:source_file:{source.id}", []), key=lambda v: v.shard)
        previous = [p for v in written if (p := _previous(by_shard[v.shard], v)) is not None]
        done = max([as_utc(source.ingested_at), *(as_utc(v.created_at) for v in written)])
        runs.append(LineageRun(
            job="ingest", key=f"source_file:{source.id}", dataset=ds.name,
            started_at=min([as_utc(source.ingested_at), *(as_utc(v.created_at) for v in written)]), completed_at=done,
            inputs=(build.source_input(ds, source), *(build.shard_input(ds, p) for p in previous)),
            outputs=tuple(build.shard_output(ds, v) for v in written),
        ))
    return runs


def _member_checkpoints(session: Session, ensemble_id: int) -> list[Checkpoint]:
    return list(session.scalars(
        select(Checkpoint).join(EnsembleMemberRow, (EnsembleMemberRow.dataset_id == Checkpoint.dataset_id)
                                & (EnsembleMemberRow.checkpoint_key == Checkpoint.key))
        .where(EnsembleMemberRow.ensemble_id == ensemble_id).order_by(Checkpoint.shard)
    ))


def train_runs(session: Session, ds: Dataset, build: _Builder, by_shard: dict[int, list[ShardVersion]]) -> list[LineageRun]:
    runs = []
    for ensemble in session.scalars(select(EnsembleVersionRow).where(EnsembleVersionRow.dataset_id == ds.id)
                                    .order_by(EnsembleVersionRow.id)):
        if ensemble.created_by.startswith("retrain:"):
            continue  # a retrain run's output (see retrain_runs)
        members = _member_checkpoints(session, ensemble.id)
        trained_on = [v for c in members for v in by_shard.get(c.shard, []) if v.version == c.shard_version]
        done = as_utc(ensemble.created_at)
        started = min([done, *(as_utc(c.created_at) for c in members)])
        runs.append(LineageRun(
            job="train", key=f"ensemble_version:{ensemble.id}", dataset=ds.name, started_at=started, completed_at=done,
            inputs=tuple(build.shard_input(ds, v) for v in trained_on),
            outputs=(build.ensemble_output(ds, ensemble.version_id),),
        ))
    return runs


def _method_counts(matches: list[RequestMatch]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"found": 0, "erased": 0, "kept": 0})
    for m in matches:
        row = table[m.method]
        row["found"] += 1
        row["erased"] += m.erased_in_shard_version is not None
        row["kept"] += m.final_decision == "keep"
    return dict(sorted(table.items()))


def _erasing_since(session: Session, request_id: str, until: datetime) -> datetime:
    """When the request last entered ``erasing`` before ``until`` (else ``until``)."""
    moments = [as_utc(at) for at in session.scalars(select(RequestEvent.at).where(
        RequestEvent.request_id == request_id, RequestEvent.to_state == "erasing"))]
    earlier = [m for m in moments if m <= until]
    return max(earlier) if earlier else until


def erase_runs(session: Session, ds: Dataset, build: _Builder, by_shard: dict[int, list[ShardVersion]]) -> list[LineageRun]:
    prefix = "erasure:request:"
    runs = []
    for shard, versions in sorted(by_shard.items()):
        for version in versions:
            if not version.created_by.startswith(prefix):
                continue
            request_id = version.created_by[len(prefix):]
            request = session.get(ErasureRequest, request_id)
            previous = _previous(versions, version)
            done = as_utc(version.created_at)
            facets: tuple[tuple[str, RunFacet], ...] = ()
            if request is not None:
                matches = list(session.scalars(select(RequestMatch).where(RequestMatch.request_id == request_id)
                                               .order_by(RequestMatch.id)))
                erased_here = session.scalar(select(func.count()).select_from(Record).where(
                    Record.dataset_id == ds.id, Record.shard == shard, Record.erased_in_shard_version == version.version))
                facets = ((ERASURE_REQUEST_FACET, ErasureRequestRunFacet(
                    requestId=request.id, state=request.state, receivedAt=event_time(request.received_at),
                    dueAt=event_time(request.due_at), shard=shard, recordsErased=int(erased_here or 0),
                    requestRecordsErased=len({(m.dataset_id, m.record_id) for m in matches
                                              if m.erased_in_shard_version is not None}),
                    matchesByMethod=_method_counts(matches), producer=build.producer)),)
            runs.append(LineageRun(
                job="erase", key=f"shard_version:{version.id}", dataset=ds.name,
                started_at=_erasing_since(session, request_id, done), completed_at=done,
                inputs=(build.shard_input(ds, previous),) if previous is not None else (),
                outputs=(build.shard_output(ds, version),), facets=facets,
            ))
    return runs


def retrain_runs(session: Session, ds: Dataset, build: _Builder, by_shard: dict[int, list[ShardVersion]]) -> list[LineageRun]:
    runs = []
    for job in session.scalars(select(ShardRetrainJob).where(ShardRetrainJob.dataset_id == ds.id,
                                                             ShardRetrainJob.status == JOB_DONE)
                               .order_by(ShardRetrainJob.id)):
        target = next((v for v in by_shard.get(job.shard, []) if v.version == job.target_shard_version), None)
        inputs = [build.shard_input(ds, target)] if target is not None else []
        outputs = []
        if job.ensemble_version_id is not None:
            produced = session.scalars(select(EnsembleVersionRow).where(
                EnsembleVersionRow.dataset_id == ds.id, EnsembleVersionRow.version_id == job.ensemble_version_id)).first()
            if produced is not None and produced.parent_version_id:
                inputs.append(build.ensemble_input(ds, produced.parent_version_id))
            outputs.append(build.ensemble_output(ds, job.ensemble_version_id))
        done = as_utc(job.finished_at or job.started_at or job.created_at)
        started = min(as_utc(job.started_at or job.created_at), done)
        runs.append(LineageRun(job="retrain", key=f"shard_retrain_job:{job.id}", dataset=ds.name,
                               started_at=started, completed_at=done, inputs=tuple(inputs), outputs=tuple(outputs)))
    return runs


# ---------------------------------------------------------------- events and export


def run_events(run: LineageRun, producer: str) -> list[RunEvent]:
    """The START and COMPLETE events of a run (the datasets on both, as the spec allows)."""
    job = Job(namespace=JOB_NAMESPACE, name=run.job)
    return [
        RunEvent(eventType=state, eventTime=event_time(moment), producer=producer,
                 run=Run(runId=run.run_id, facets=dict(run.facets)), job=job,
                 inputs=list(run.inputs), outputs=list(run.outputs))
        for state, moment in ((RunState.START, run.started_at), (RunState.COMPLETE, run.completed_at))
    ]


def lineage_runs(session: Session, dataset: str | None = None, since: datetime | None = None) -> list[LineageRun]:
    """Every run recorded for ``dataset`` (all datasets when None) that completed at or after ``since``."""
    query = select(Dataset).order_by(Dataset.name)
    if dataset is not None:
        query = query.where(Dataset.name == dataset)
    datasets = list(session.scalars(query))
    if dataset is not None and not datasets:
        raise LookupError(f"no dataset named {dataset!r}; ingest a file first (`erasure ingest FILE --dataset {dataset}`)")
    build = _Builder(producer_url())
    runs: list[LineageRun] = []
    for ds in datasets:
        by_shard = _versions_by_shard(session, ds)
        for collect in (ingest_runs, train_runs, erase_runs, retrain_runs):
            runs.extend(collect(session, ds, build, by_shard))
    if since is not None:
        cutoff = as_utc(since)
        runs = [r for r in runs if r.completed_at >= cutoff]
    return sorted(runs, key=lambda r: (r.started_at, JOBS.index(r.job), r.dataset, r.key))


def export_lineage(session: Session, out: Path | str | IO[str], dataset: str | None = None,
                   since: datetime | None = None) -> dict[str, Any]:
    """Write the OpenLineage events of ``dataset`` (or of all datasets) as JSON lines to
    ``out`` — a path (written atomically: temporary file, fsync, rename) or an open text
    stream. Returns the counts: runs per job and events written."""
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware (UTC), e.g. 2024-05-01T00:00:00+00:00")
    producer = producer_url()
    runs = lineage_runs(session, dataset, since)
    events = [e for run in runs for e in run_events(run, producer)]
    # chronological; a run's START before its COMPLETE; ties in a fixed order
    order = {id(e): i for i, e in enumerate(events)}
    events.sort(key=lambda e: (e.eventTime, e.eventType != RunState.START, order[id(e)]))
    buffer = io.StringIO()
    for event in events:
        buffer.write(Serde.to_json(event) + "\n")
    if isinstance(out, (str, Path)):
        write_atomically(Path(out), buffer.getvalue().encode("utf-8"))
    else:
        out.write(buffer.getvalue())
        out.flush()
    counts = {job: sum(r.job == job for r in runs) for job in JOBS}
    return {"runs": counts, "events": len(events)}

"""Ingest one source file into a dataset: validate everything, then place the
records into shards and slices, write new shard versions, record lineage.

Order of effects (why: nothing is half-ingested):
  1. validate every row (pass 1) — on any error nothing has been written;
  2. place the new rows (by subject: ``pipeline.placement``, or by record id) and
     spill them per shard into temporary Arrow files (pass 2);
  3. write each affected shard's next version (old rows + new rows);
  4. one database transaction records the source file, records, keyed
     identifier hashes and shard versions; if it fails the new shard version
     files are deleted again, so the previous versions stay the latest. (A load
     larger than the lineage tables rebuilds their keys in that transaction:
     ``db.lineage.lineage_bulk_load``.)
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.compute as pc

from db.lineage import (
    IDENTIFIER_COLUMNS,
    RECORD_COLUMNS,
    add_shard_version,
    add_source_file,
    bulk_insert,
    digests_from_hex,
    ensure_dataset,
    find_source_file,
    get_dataset,
    latest_shard_versions,
    lineage_bulk_load,
    record_contents,
)
from db.audit import append_event
from db.locks import lock_shard
from db.session import unit_of_work
from db.settings import Settings
from dedup.embeddings import embed_in_chunks
from dedup.identifiers import content_hmac, key_id, keyed_hash
from pipeline.database import open_database
from pipeline.object_store import publish_file, publish_index, shard_file
from pipeline.locate import build_and_save_index, dataset_embedder, dataset_minhash, load_tombstones, remove_index
from pipeline.rekey import rekey_live_records
from pipeline.labels import LabelPlan, LabelVocabularyChanged, plan_labels, record_labels
from pipeline.placement import NewRecord, place_batch_by_subject, resolve_placement, subject_options
from pipeline.progress import Reporter, SilentReporter
from shards.assign import Placement, place_record, validate_layout
from shards.placement import DEFAULT_LINKING_KINDS, DEFAULT_MAX_RECORDS_PER_IDENTIFIER
from shards.sources import (
    CleanRow,
    FieldMap,
    SourceError,
    ValidationReport,
    clean_row,
    detect_format,
    file_sha256,
    read_rows,
)
from shards.store import ShardStore, ShardVersionRef, build_shard_table, sort_training_order, validate_dataset_name

DEFAULT_FEATURE_DIM = 256
_SPILL_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("slice", pa.int32()),
        ("order_key", pa.int64()),
        ("text", pa.string()),
        ("label", pa.int64()),
        ("content_hmac", pa.string()),
        ("row_number", pa.int64()),
        ("identifiers", pa.list_(pa.struct([("kind", pa.string()), ("keyed_hash", pa.string())]))),
    ]
)


class ShardChangedDuringIngest(RuntimeError):
    """A shard got a new version (an erasure) between reading and recording it."""


class IngestValidationError(ValueError):
    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.summary())


@dataclass(frozen=True)
class IngestOptions:
    dataset: str
    fields: FieldMap = FieldMap()
    n_shards: int = 4
    n_slices: int = 4
    seed: int = 0
    fmt: str | None = None
    embedder: str = "hashing"  # "minilm" for paraphrase search by meaning (slower)
    # "subject" | "record"; None: the dataset's, or for a new one "subject" when there are identifier fields
    placement: str | None = None
    linking_kinds: tuple[str, ...] = DEFAULT_LINKING_KINDS  # identifier kinds that link records to one subject
    max_records_per_identifier: int = DEFAULT_MAX_RECORDS_PER_IDENTIFIER  # above: the value links nothing
    allow_new_labels: bool = False  # class names the dataset's vocabulary lacks are refused unless True


@dataclass
class IngestSummary:
    dataset: str
    source_file: str
    sha256: str
    status: str  # "ingested" | "already_ingested"
    rows: int
    new_records: int
    skipped_existing: int
    screened_out: int
    shards: int
    slices: int
    per_shard_counts: dict[int, int]
    new_per_shard: dict[int, int]
    shard_versions: dict[int, int]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    screened: list[dict] = field(default_factory=list)  # records refused by the tombstone screen
    placement: str = "record"
    placement_report: dict = field(default_factory=dict)  # subject placement: subjects, copies joined, hubs
    labels: dict = field(default_factory=dict)  # pipeline.labels.LabelPlan.summary(): kind, classes, names added
    # how the lineage tables' keys were kept during the insert: "incremental" or "rebuild" (db.lineage_bulk_load)
    lineage_keys: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("per_shard_counts", "new_per_shard", "shard_versions"):
            data[key] = {str(k): v for k, v in data[key].items()}
        return data


def _identifier_hashes(row: CleanRow, key: bytes) -> list[tuple[str, str]]:
    # Two fields may carry the same identifier: store each (kind, hash) once.
    return list(dict.fromkeys((kind, keyed_hash(key, kind, value)) for kind, value in row.identifiers))


def _validate(
    path: Path, fmt: str, fields: FieldMap, existing: dict[str, str | None], key: bytes, reporter: Reporter,
    labels: set | None = None,
) -> tuple[int, int]:
    """Pass 1: every row checked; returns (rows, rows already ingested unchanged); the labels seen go into
    ``labels``."""
    report = ValidationReport()
    seen: dict[str, int] = {}
    rows = unchanged = 0
    with reporter.step("validating", None) as step:
        for number, raw in read_rows(path, fmt):
            rows += 1
            step.advance()
            row = clean_row(number, raw, fields, fmt, report)
            if row is None:
                continue
            first = seen.get(row.record_id)
            if first is not None:
                report.add(number, f"duplicate id {row.record_id!r} (first seen in row {first})")
                continue
            seen[row.record_id] = number
            if labels is not None and row.label is not None:
                labels.add(row.label)
            try:
                _identifier_hashes(row, key)
            except ValueError as exc:
                report.add(number, f"bad identifier: {exc}")
                continue
            if row.record_id in existing:
                earlier = existing[row.record_id]
                # None: a record erased before content digests were keyed (migration 0006); its
                # text is gone, so the id is skipped without comparing (an erased id never comes back).
                if earlier is not None and earlier != content_hmac(key, row.text):
                    report.add(
                        number,
                        f"id {row.record_id!r} was ingested earlier with a different text; "
                        "record ids are immutable — give the new text a new id",
                    )
                else:
                    unchanged += 1
    if rows == 0:
        report.add(0, "the file holds no records")
    if report.error_count:
        raise IngestValidationError(report)
    return rows, unchanged


def _new_records(path: Path, fmt: str, fields: FieldMap, existing: dict[str, str | None],
                 key: bytes) -> list[NewRecord]:
    """The validated file's new records (id, keyed identifier hashes, text), for subject placement."""
    report = ValidationReport()
    out = []
    for number, raw in read_rows(path, fmt):
        row = clean_row(number, raw, fields, fmt, report)
        if row is None:
            raise SourceError(f"{path} changed while it was being ingested (row {number}); run ingest again")
        if row.record_id not in existing:
            out.append(NewRecord(row.record_id, tuple(_identifier_hashes(row, key)), row.text))
    return out


def _spill(
    path: Path,
    fmt: str,
    options: IngestOptions,
    existing: dict[str, str | None],
    key: bytes,
    spill_dir: Path,
    total: int,
    reporter: Reporter,
    places: dict[str, Placement] | None = None,
    label_plan: LabelPlan | None = None,
) -> dict[int, Path]:
    """Pass 2: accepted new rows, placed (``places``, else by record id) and hashed, into one Arrow file per shard."""
    buffers: dict[int, list[dict]] = {}
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    paths: dict[int, Path] = {}

    def flush(shard: int) -> None:
        if shard not in writers:
            paths[shard] = spill_dir / f"shard-{shard:05d}.arrow"
            writers[shard] = ipc.new_file(paths[shard], _SPILL_SCHEMA)
        writers[shard].write_batch(pa.RecordBatch.from_pylist(buffers[shard], schema=_SPILL_SCHEMA))
        buffers[shard] = []

    recheck = ValidationReport()
    try:
        with reporter.step("placing records", total) as step:
            for number, raw in read_rows(path, fmt):
                step.advance()
                row = clean_row(number, raw, options.fields, fmt, recheck)
                if row is None:
                    raise SourceError(f"{path} changed while it was being ingested (row {number}); run ingest again")
                if row.record_id in existing:
                    continue
                place = (places[row.record_id] if places is not None
                         else place_record(row.record_id, options.seed, options.n_shards, options.n_slices))
                buffers.setdefault(place.shard, []).append(
                    {
                        "record_id": row.record_id,
                        "slice": place.slice,
                        "order_key": place.order_key,
                        "text": row.text,
                        "label": label_plan.index(row.label) if label_plan is not None else row.label,
                        "content_hmac": content_hmac(key, row.text),
                        "row_number": row.row,
                        "identifiers": [{"kind": k, "keyed_hash": h} for k, h in _identifier_hashes(row, key)],
                    }
                )
                if len(buffers[place.shard]) >= 4096:
                    flush(place.shard)
        for shard, rows in buffers.items():
            if rows:
                flush(shard)
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def _read_spill(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


def ingest_source_file(
    path: Path | str, options: IngestOptions, settings: Settings, reporter: Reporter | None = None
) -> IngestSummary:
    """Validate and ingest ``path`` into ``options.dataset``; idempotent per file content."""
    started = time.perf_counter()
    reporter = reporter or SilentReporter()
    path = Path(path)
    validate_dataset_name(options.dataset)
    validate_layout(options.n_shards, options.n_slices)
    fmt = detect_format(path, options.fmt)
    sha = file_sha256(path)
    key = settings.secret_key_bytes()
    engine = open_database(settings)
    embedder = dataset_embedder(options.embedder, DEFAULT_FEATURE_DIM)
    embedder_name = embedder.name
    store = ShardStore(settings.shards_dir)
    timings: dict[str, float] = {}

    with unit_of_work(engine) as session:
        dataset = get_dataset(session, options.dataset)
        placement = resolve_placement(options.placement, dataset, bool(options.fields.identifier_fields))
        existing: dict[str, str | None] = {}
        recorded_versions: dict[int, int] = {}
        if dataset is not None:
            # Fail fast on a layout conflict, before reading a big file.
            ensure_dataset(
                session, name=options.dataset, seed=options.seed, n_shards=options.n_shards,
                n_slices=options.n_slices, feature_dim=embedder.dim, embedder=embedder_name, key_id=key_id(key),
                placement=placement,
            )
            done = find_source_file(session, dataset.id, sha)
            if done is not None:
                versions = latest_shard_versions(session, dataset.id)
                return IngestSummary(
                    dataset=options.dataset, source_file=str(path), sha256=sha, status="already_ingested",
                    rows=done.row_count, new_records=0, skipped_existing=done.row_count, screened_out=0,
                    shards=dataset.n_shards, slices=dataset.n_slices,
                    per_shard_counts={s: v.row_count for s, v in sorted(versions.items())},
                    new_per_shard={}, shard_versions={s: v.version for s, v in sorted(versions.items())},
                    seconds=round(time.perf_counter() - started, 3),
                )
            # Live records from before keyed digests get their HMAC now that the key is at hand.
            rekey_live_records(session, dataset, key)
            existing = record_contents(session, dataset.id)
            recorded_versions = {s: v.version for s, v in latest_shard_versions(session, dataset.id).items()}
            for version in latest_shard_versions(session, dataset.id).values():
                shard_file(settings, version, options.dataset)  # a storage URL: the version appended to, fetched here

    t = time.perf_counter()
    labels_seen: set = set()
    rows, unchanged = _validate(path, fmt, options.fields, existing, key, reporter, labels_seen)
    with unit_of_work(engine) as session:
        label_plan = plan_labels(session, get_dataset(session, options.dataset), labels_seen,
                                 allow_new_labels=options.allow_new_labels, dataset_name=options.dataset)
    timings["validate_s"] = time.perf_counter() - t

    tombstones = load_tombstones(settings, options.dataset)  # an unkeyed file fails here, before any write
    minhash = dataset_minhash(settings, options.dataset)
    spill_dir = settings.home / "tmp" / f"ingest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    spill_dir.mkdir(parents=True, exist_ok=True)
    written: list[ShardVersionRef] = []
    new_per_shard: dict[int, int] = {}
    screened: dict[str, dict] = {}  # record id -> why it was not ingested (no text kept)
    try:
        t = time.perf_counter()
        places, placement_report = None, {}
        if placement == "subject":
            batch = _new_records(path, fmt, options.fields, existing, key)
            with unit_of_work(engine) as session:
                placed = place_batch_by_subject(
                    settings, session, options.dataset, batch, options.n_shards, options.n_slices, options.seed,
                    subject_options(options.linking_kinds, options.max_records_per_identifier))
            places, placement_report = placed.places, placed.report()
            timings["subjects_s"] = time.perf_counter() - t
        spills = _spill(path, fmt, options, existing, key, spill_dir, rows, reporter, places, label_plan)
        if file_sha256(path) != sha:
            raise SourceError(f"{path} changed while it was being ingested; run ingest again")
        timings["place_s"] = time.perf_counter() - t

        t = time.perf_counter()
        with reporter.step("writing shard versions", len(spills)) as step:
            for shard in sorted(spills):
                new = _read_spill(spills[shard])
                if tombstones is not None and len(tombstones):
                    # Erased content must not come back with a data refresh.
                    hits = tombstones.screen(new["text"].to_pylist())
                    rows_hit = {}
                    for hit in hits:
                        rows_hit.setdefault(hit.text_index, hit)
                    if rows_hit:
                        ids = new["record_id"].to_pylist()
                        numbers = new["row_number"].to_pylist()
                        for i, hit in rows_hit.items():
                            screened[ids[i]] = {"row": numbers[i], "tombstone": hit.key,
                                                "estimated_jaccard": round(hit.estimated_jaccard, 3)}
                        keep = np.ones(new.num_rows, dtype=bool)
                        keep[list(rows_hit)] = False
                        new = new.filter(pa.array(keep))
                if new.num_rows == 0:
                    step.advance()
                    continue
                new_per_shard[shard] = new.num_rows
                texts = new["text"].to_pylist()
                with reporter.step(f"embedding shard {shard} ({embedder.name})", len(texts)) as embedding:
                    # 512 texts a step: a rate and an ETA within seconds, batches still sorted by length
                    vectors = embed_in_chunks(embedder, texts, embedding.advance, chunk=512)
                table = build_shard_table(
                    new["record_id"].to_pylist(),
                    new["slice"].to_numpy(),
                    new["order_key"].to_numpy(),
                    texts,
                    new["label"].to_pylist(),
                    vectors,
                )
                if shard in recorded_versions:
                    # Append to the recorded latest version (not a stray unrecorded file).
                    old = store.read(options.dataset, shard, recorded_versions[shard])
                    table = sort_training_order(pa.concat_tables([old, table]))
                ref = store.write_version(options.dataset, shard, table)
                written.append(ref)
                build_and_save_index(ref, embedder, minhash, table)
                step.advance()
        timings["write_shards_s"] = time.perf_counter() - t

        # The lineage rows are built and sorted before the transaction opens: its locks (with a key
        # rebuild, readers of the lineage tables wait) are held for the writes alone.
        t = time.perf_counter()
        lineage = _lineage_rows(spills, written, screened)
        timings["lineage_prepare_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with unit_of_work(engine) as session:
            dataset = ensure_dataset(
                session, name=options.dataset, seed=options.seed, n_shards=options.n_shards,
                n_slices=options.n_slices, feature_dim=embedder.dim, embedder=embedder_name, key_id=key_id(key),
                placement=placement,
            )
            try:
                record_labels(session, dataset, label_plan)
            except LabelVocabularyChanged as exc:
                raise ShardChangedDuringIngest(str(exc)) from exc
            source = add_source_file(
                session, dataset_id=dataset.id, path=str(path.resolve()), sha256=sha, fmt=fmt,
                row_count=rows, new_record_count=sum(new_per_shard.values()),
            )
            # An erasure may have written a shard since we read it: appending to the old
            # version would bring the erased records back. Lock (in shard order), then re-check.
            for ref in written:
                lock_shard(session, dataset.id, ref.shard)
            now_latest = {s: v.version for s, v in latest_shard_versions(session, dataset.id).items()}
            for ref in written:
                if now_latest.get(ref.shard) != recorded_versions.get(ref.shard):
                    raise ShardChangedDuringIngest(
                        f"shard {ref.shard} of {options.dataset} changed while this file was being ingested "
                        f"(version {recorded_versions.get(ref.shard)} -> {now_latest.get(ref.shard)}, "
                        "an erasure or another ingest); nothing was ingested: run the same ingest again"
                    )
            for ref in written:
                add_shard_version(  # a storage URL: uploaded now, live when this transaction commits
                    session, dataset_id=dataset.id, shard=ref.shard, version=ref.version,
                    path=publish_file(settings, ref.path, ref.sha256), index_url=publish_index(settings, ref.path),
                    sha256=ref.sha256, row_count=ref.row_count, created_by=f"ingest:source_file:{source.id}",
                )
            with reporter.step("recording lineage", sum(new_per_shard.values())) as step:
                with lineage_bulk_load(session, sum(new_per_shard.values())) as lineage_keys:
                    t_rows = time.perf_counter()
                    records, identifiers = lineage.with_ids(dataset.id, source.id)
                    bulk_insert(session, "records", records)
                    bulk_insert(session, "record_identifiers", identifiers)
                    step.advance(records.num_rows)
                    timings["lineage_rows_s"] = time.perf_counter() - t_rows
                    t_keys = time.perf_counter()
                timings["lineage_keys_s"] = time.perf_counter() - t_keys  # the set-wise rebuild, if any
            versions = latest_shard_versions(session, dataset.id)
            per_shard = {s: v.row_count for s, v in sorted(versions.items())}
            latest = {s: v.version for s, v in sorted(versions.items())}
            append_event(session, "dataset.ingested", {
                "dataset": options.dataset, "source_file_id": source.id, "source_sha256": sha, "rows": rows,
                "new_records": sum(new_per_shard.values()), "skipped_existing": unchanged,
                "screened_out": len(screened),
                # the requests whose tombstones were hit (a key is "<request id>/<shard>/<record id>")
                "tombstones_hit": sorted({w["tombstone"].split("/", 1)[0] for w in screened.values()}),
                "shard_versions": [{"shard": r.shard, "version": r.version, "sha256": r.sha256, "rows": r.row_count}
                                   for r in written],
                "placement": placement,
                # subject placement: counts, and the keyed hashes of identifier values that linked too much
                **({"placement_report": placement_report} if placement_report else {}),
                "labels_added": len(label_plan.added),
            }, actor="flow:ingest")
        timings["lineage_s"] = time.perf_counter() - t
    except BaseException as exc:
        for ref in written:
            try:
                remove_index(ref.path)
                store.remove_version_file(ref)
            except OSError as cleanup:  # keep the original error; say what is left for the sweep
                exc.add_note(f"shard version {ref.path} could not be rolled back ({cleanup}); `erasure gc` removes it")
        try:
            shutil.rmtree(spill_dir)
        except FileNotFoundError:
            pass
        except OSError as cleanup:
            exc.add_note(f"the spill folder {spill_dir} could not be removed ({cleanup}); `erasure gc` removes it")
        raise
    # The spill files hold the ingested texts: a failure to delete them is an error, not a detail.
    shutil.rmtree(spill_dir)

    return IngestSummary(
        dataset=options.dataset, source_file=str(path), sha256=sha, status="ingested", rows=rows,
        new_records=sum(new_per_shard.values()), skipped_existing=unchanged, screened_out=len(screened),
        shards=options.n_shards, slices=options.n_slices, per_shard_counts=per_shard,
        new_per_shard=dict(sorted(new_per_shard.items())), shard_versions=latest,
        seconds=round(time.perf_counter() - started, 3),
        timings={k: round(v, 3) for k, v in timings.items()},
        screened=[{"record_id": rid, **why} for rid, why in sorted(screened.items())],
        placement=placement, placement_report=placement_report, labels=label_plan.summary(),
        lineage_keys=lineage_keys,
    )


# record_identifiers' primary key (migrations 0014, 0017), bytewise as PostgreSQL compares bytea
_IDENTIFIER_KEY_ORDER = [("keyed_hash", "ascending"), ("kind", "ascending"), ("record_id", "ascending")]


@dataclass(frozen=True)
class LineageRows:
    """The ``records`` and ``record_identifiers`` rows of an ingest, each sorted by its primary key
    (a maintained key grows at its end, a rebuilt one sorts presorted input), without the dataset
    and source-file ids that the lineage transaction assigns."""

    records: pa.Table  # RECORD_COLUMNS without dataset_id and source_file_id
    identifiers: pa.Table  # IDENTIFIER_COLUMNS without dataset_id

    def with_ids(self, dataset_id: int, source_id: int) -> tuple[pa.Table, pa.Table]:
        n, m = self.records.num_rows, self.identifiers.num_rows
        records = self.records.append_column("dataset_id", _constant(dataset_id, n)) \
                              .append_column("source_file_id", _constant(source_id, n))
        identifiers = self.identifiers.append_column("dataset_id", _constant(dataset_id, m))
        return records.select(list(RECORD_COLUMNS)), identifiers.select(list(IDENTIFIER_COLUMNS))


def _lineage_rows(spills: dict[int, Path], written: list[ShardVersionRef], screened: dict[str, dict]) -> LineageRows:
    """The lineage rows of the written shards, across all shards, each table sorted by its key."""
    records, identifiers = [], []
    for ref in written:
        spill = _read_spill(spills[ref.shard]).select(["record_id", "slice", "content_hmac", "row_number",
                                                       "identifiers"])
        if screened:
            spill = spill.filter(pa.array([rid not in screened for rid in spill["record_id"].to_pylist()]))
        n = spill.num_rows
        records.append(pa.table({
            "record_id": spill["record_id"], "shard": _constant(ref.shard, n), "slice": spill["slice"],
            "content_hmac": spill["content_hmac"], "row_number": spill["row_number"],
            "first_shard_version": _constant(ref.version, n),
        }))
        nested = spill["identifiers"].combine_chunks()
        flat = pc.list_flatten(nested)
        identifiers.append(pa.table({
            "record_id": pc.take(spill["record_id"], pc.list_parent_indices(nested)),
            "kind": flat.field("kind"), "keyed_hash": flat.field("keyed_hash"),
        }))
    if not records:
        return LineageRows(
            pa.table({"record_id": pa.array([], pa.string()), "shard": _constant(0, 0), "slice": _constant(0, 0),
                      "content_hmac": pa.array([], pa.string()), "row_number": _constant(0, 0),
                      "first_shard_version": _constant(0, 0)}),
            pa.table({"record_id": pa.array([], pa.string()), "kind": pa.array([], pa.string()),
                      "keyed_hash": digests_from_hex(pa.array([], pa.string()))}))
    identifiers = pa.concat_tables(identifiers)
    # the hashes as the bytes the table stores (db.lineage.bulk_insert), decoded before the transaction
    identifiers = identifiers.set_column(identifiers.column_names.index("keyed_hash"), "keyed_hash",
                                         digests_from_hex(identifiers["keyed_hash"]))
    with ThreadPoolExecutor(1) as sorter:  # Arrow sorts without the GIL: both tables side by side
        identifiers_sorted = sorter.submit(identifiers.sort_by, _IDENTIFIER_KEY_ORDER)
        records_sorted = pa.concat_tables(records).sort_by("record_id")
        return LineageRows(records_sorted, identifiers_sorted.result())


def _constant(value: int, n: int) -> pa.Array:
    return pa.array(np.full(n, value, dtype=np.int32))

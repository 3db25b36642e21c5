"""The sweep: remove what a killed or failed process left under the data home.

``sweep`` runs when a request completes (``pipeline.processing``) and as
``erasure gc``. It classifies every file and folder it knows the naming of
(``classify_home``, also the inventory of the residue check) and removes:

- superseded shard versions, their locate indexes and checkpoints that still
  hold erased records (a purge deferred by a sibling request that since failed,
  or by one whose completion never came): ``pipeline.erasure.purge_shard_files``;
- shard version files no database row names (an ingest or erasure killed between
  writing the file and committing its row), with their ``.dedup`` indexes; a file
  whose writer still runs (the PID of its writer marker, ``shards.store``, and the
  process's start time) may be in flight and is kept; the markers of recorded
  versions (empty of data) go too;
- locate indexes of versions that are gone or unrecorded;
- temporary files and folders (``.tmp-<pid>``, ``.old-<pid>``) of processes that
  no longer run, ingest spill folders (``tmp/ingest-<pid>-...``), and temporary
  names without a PID (older versions) once older than the grace period;
- checkpoint files whose row says they were purged, and unrecorded checkpoints
  that saw an erased record (a training killed before recording them);
- with a storage URL (``pipeline.object_store``): objects no row names (a writer
  whose transaction rolled back, superseded tombstones) once older than
  ``ERASURE_STORAGE_ORPHAN_GRACE_S``, and objects only purged rows name; each
  deletion is checked. The home is then this host's cache: a cached copy is live
  while its row is (the row names the object; its copy lies where it would on one
  machine), and a copy of a purged version or checkpoint is removed like the file.

Nothing a live row names is touched, nor a file of a process that still runs.
Each deletion error is reported (in the result and the audit event), never
ignored. The audit event ``gc.swept`` holds counts by kind only. SQLite: the
write-ahead log is checkpointed with TRUNCATE afterwards (and VACUUM run after a
request with samples); PostgreSQL: the sample tables are vacuumed
(``db.maintenance``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.audit import MembershipProbe, append_event
from db.maintenance import after_erasure
from db.models import Dataset, Record, ShardVersion, SourceFile, utcnow
from db.requests import ErasureRequest
from db.session import unit_of_work
from db.settings import Settings
from db.training import BaselineModel, Checkpoint, EnsembleVersionRow
from db.locks import is_lock_file, lock_shard
from pipeline.erasure import purge_shard_files, shard_purge_blocked_by
from pipeline.object_store import is_object_url, object_store, shard_version_home_path
from shards.files import is_temp_name, temp_writer_pid, writer_alive
from shards.store import WRITER_MARK, ShardStore

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0  # temporary names without a PID: older than this, no writer is still on them
ACTOR = "system:gc"

# what a path is (the inventory's and the sweep's vocabulary; enums in the audit event)
LIVE = "live"  # named by a live database row, or a known key/config/database file
REMOVABLE = "removable"  # a leftover: the sweep removes it
IN_FLIGHT = "in_flight"  # a leftover of a process that still runs (or too young to judge)
UNKNOWN = "unknown"  # no rule knows it: reported as an orphan, never removed

KNOWN_ROOT_FILES = ("secret.key", "signing_key.pem")
UP_STATE_FILE = "up.json"  # api/up_state.py: where a running `erasure up` is (pids, URLs; no secret)
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str  # e.g. shard_version, unrecorded_shard_version, shard_temp, ingest_spill, ...
    status: str  # LIVE | REMOVABLE | IN_FLIGHT | UNKNOWN
    is_dir: bool = False

    def to_dict(self, home: Path) -> dict:
        return {"path": _rel(self.path, home), "kind": self.kind, "status": self.status}


@dataclass
class SweepReport:
    removed: dict[str, int] = field(default_factory=dict)
    kept_in_flight: dict[str, int] = field(default_factory=dict)
    unknown: int = 0
    errors: list[dict] = field(default_factory=list)  # {"kind", "path", "error"}: where and why, no content
    purged_superseded: dict[str, int] = field(default_factory=lambda: {"shard_versions": 0, "checkpoints": 0})
    deferred_shards: list[dict] = field(default_factory=list)
    database: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def audit_details(self) -> dict:
        """Counts by kind only (no paths, no content)."""
        return {"removed": dict(sorted(self.removed.items())),
                "kept_in_flight": dict(sorted(self.kept_in_flight.items())),
                "unknown": self.unknown,
                "errors": dict(sorted(Counter(e["kind"] for e in self.errors).items())),
                "purged_superseded": self.purged_superseded,
                "deferred_shards": len(self.deferred_shards)}

    def to_dict(self) -> dict:
        return {"ok": self.ok, **self.audit_details(), "errors": self.errors,
                "deferred_shards": self.deferred_shards, "database": self.database,
                "seconds": round(self.seconds, 3)}


def _rel(path: Path, home: Path) -> str:
    try:
        return str(path.relative_to(home))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- classification


@dataclass(frozen=True)
class _Live:
    """What the database names: live files, purged ones, and the erased record ids."""

    shard_versions: dict[Path, bool]  # path -> files purged
    checkpoints: dict[Path, bool]
    manifests: set[Path]
    sources: set[Path]
    datasets: dict[str, int]
    requests: set[str]
    erased_ids: dict[str, set[str]]  # dataset name -> erased record ids


def _live(session: Session, settings: Settings | None = None) -> _Live:
    datasets = {d.name: d.id for d in session.scalars(select(Dataset))}
    names = {v: k for k, v in datasets.items()}

    # With a storage URL a row names an object; its copy on this host lies where the file would on one machine.
    def here(recorded: str, home_path) -> Path:  # noqa: ANN001 - a callable: computed only for objects
        return home_path() if settings is not None and is_object_url(recorded) else Path(recorded)

    def checkpoint_here(recorded: str, dataset_id: int, key: str) -> Path:
        return here(recorded, lambda: settings.home / "checkpoints" / names[dataset_id] / key[:2] / f"{key}.pt")

    versions = {here(p, lambda: shard_version_home_path(settings, names[d], s, v)): purged is not None
                for p, purged, d, s, v in session.execute(select(
                    ShardVersion.path, ShardVersion.files_purged_at, ShardVersion.dataset_id, ShardVersion.shard,
                    ShardVersion.version))}
    checkpoints = {checkpoint_here(p, d, k): purged is not None for p, purged, d, k in session.execute(
        select(Checkpoint.path, Checkpoint.file_purged_at, Checkpoint.dataset_id, Checkpoint.key))}
    # monolithic baselines (erasure train --baseline) live among the checkpoints; purged with them
    for p, purged, d, k in session.execute(select(BaselineModel.path, BaselineModel.file_purged_at,
                                                  BaselineModel.dataset_id, BaselineModel.checkpoint_key)):
        path = checkpoint_here(p, d, k)
        checkpoints[path] = checkpoints.get(path, True) and purged is not None  # live if any row is
    erased: dict[str, set[str]] = {}
    for dataset_id, record_id in session.execute(
            select(Record.dataset_id, Record.record_id).where(Record.erased_in_shard_version.is_not(None))):
        erased.setdefault(names[dataset_id], set()).add(record_id)
    manifests = {here(p, lambda: settings.home / "ensembles" / names[d] / f"{v}.json")
                 for p, d, v in session.execute(select(EnsembleVersionRow.manifest_path, EnsembleVersionRow.dataset_id,
                                                       EnsembleVersionRow.version_id))}
    return _Live(versions, checkpoints, manifests,
                 {Path(p) for p in session.scalars(select(SourceFile.path))}, datasets,
                 set(session.scalars(select(ErasureRequest.id))), erased)


def _temp_status(path: Path, now: float, grace_s: float) -> str:
    """A temporary name: removable once its writer is gone (PID in the name), or, without a
    PID, once older than the grace period."""
    mtime = path.lstat().st_mtime
    pid = temp_writer_pid(path.name)
    if pid is not None:
        return IN_FLIGHT if writer_alive(pid, mtime) else REMOVABLE
    return REMOVABLE if now - mtime > grace_s else IN_FLIGHT


def _entry(path: Path, kind: str, status: str) -> Entry:
    return Entry(path, kind, status, path.is_dir() and not path.is_symlink())


def _walk_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() or path.is_symlink():
            yield path


def classify_home(settings: Settings, session: Session, *, grace_s: float = DEFAULT_GRACE_S,
                  database_files: tuple[Path, ...] = ()) -> list[Entry]:
    """Every file (and leftover folder) under the data home, with what it is and whether
    the sweep may remove it. Folders that are leftovers as a whole (temporary index
    folders, spill folders, orphan indexes) are one entry."""
    home = settings.home
    now = time.time()
    live = _live(session, settings)
    entries: list[Entry] = []
    if not home.exists():
        return entries
    store = ShardStore(settings.shards_dir)
    claimed: set[Path] = set()  # folders classified as a whole

    # shards/<dataset>/shard-NNNNN/...
    if settings.shards_dir.is_dir():
        for dataset_dir in sorted(p for p in settings.shards_dir.iterdir()):
            for shard_dir in sorted(dataset_dir.iterdir()) if dataset_dir.is_dir() else [dataset_dir]:
                if not shard_dir.is_dir():
                    entries.append(_entry(shard_dir, "unknown_file", UNKNOWN))
                    continue
                entries += _classify_shard_dir(shard_dir, live, store, now, grace_s)
                claimed.add(shard_dir)
    # checkpoints/<dataset>/<kk>/<key>.pt
    checkpoints_dir = home / "checkpoints"
    if checkpoints_dir.is_dir():
        for path in _walk_files(checkpoints_dir):
            dataset = path.relative_to(checkpoints_dir).parts[0]
            if is_temp_name(path.name):
                entries.append(_entry(path, "atomic_temp", _temp_status(path, now, grace_s)))
            elif path in live.checkpoints:
                entries.append(_entry(path, "purged_checkpoint" if live.checkpoints[path] else "checkpoint",
                                      REMOVABLE if live.checkpoints[path] else LIVE))
            elif path.suffix == ".pt":
                saw = _saw_erased(path, live.erased_ids.get(dataset, set()))
                entries.append(_entry(path, "unrecorded_checkpoint_with_erased_records" if saw
                                      else "unrecorded_checkpoint", REMOVABLE if saw else UNKNOWN))
            else:
                entries.append(_entry(path, "unknown_file", UNKNOWN))
        claimed.add(checkpoints_dir)
    # tombstones/<dataset>.npz, ensembles/<dataset>/<id>.json, reports/<request>/...
    for folder, rule in (("tombstones", _tombstone_kind), ("ensembles", _manifest_kind), ("reports", _report_kind)):
        root = home / folder
        if not root.is_dir():
            continue
        for path in _walk_files(root):
            if is_temp_name(path.name):
                entries.append(_entry(path, "atomic_temp", _temp_status(path, now, grace_s)))
            else:
                kind, status = rule(path, root, live)
                entries.append(_entry(path, kind, status))
        claimed.add(root)
    # tmp/ingest-<pid>-<hex>/ : spill folders
    tmp = home / "tmp"
    if tmp.is_dir():
        for path in sorted(tmp.iterdir()):
            pid = _spill_pid(path.name)
            if pid is not None and path.is_dir():
                status = IN_FLIGHT if writer_alive(pid, path.lstat().st_mtime) else REMOVABLE
                entries.append(_entry(path, "ingest_spill", status))
            else:
                entries.append(_entry(path, "unknown_file", UNKNOWN))
        claimed.add(tmp)
    # Prefect's own home (its database, results, logs): the residue check asks Prefect's API about it;
    # prefect-server/ is the one of `erasure up`'s server
    for name in ("prefect", "prefect-server"):
        if (home / name).is_dir():
            claimed.add(home / name)
            entries.append(Entry(home / name, "prefect_home", LIVE, True))
    # `erasure up`'s children's output (ids and counts, as every log of ours)
    if (home / "up-logs").is_dir():
        claimed.add(home / "up-logs")
        entries.append(Entry(home / "up-logs", "service_logs", LIVE, True))
    # everything else: keys, the database, ingested source files, the rest
    for path in _walk_files(home):
        if any(parent in claimed for parent in path.parents):
            continue
        entries.append(_entry(path, *_other_kind(path, home, live, database_files, now, grace_s)))
    return entries


def _classify_shard_dir(shard_dir: Path, live: _Live, store: ShardStore, now: float, grace_s: float) -> list[Entry]:
    out: list[Entry] = []
    versions = {p.name: p for p in shard_dir.iterdir() if p.name.endswith(".parquet") and not is_temp_name(p.name)}
    unrecorded_status: dict[str, str] = {}
    for name, path in sorted(versions.items()):
        if path in live.shard_versions:
            purged = live.shard_versions[path]
            out.append(_entry(path, "purged_shard_version" if purged else "shard_version",
                              REMOVABLE if purged else LIVE))
            unrecorded_status[name] = REMOVABLE if purged else LIVE
        else:
            try:
                in_flight = store.writer_may_be_in_flight(path)
            except OSError:  # unreadable footer (a torn file): nobody will record it
                in_flight = False
            status = IN_FLIGHT if in_flight else REMOVABLE
            out.append(_entry(path, "unrecorded_shard_version", status))
            unrecorded_status[name] = status
    for path in sorted(shard_dir.iterdir()):
        name = path.name
        if name in versions:
            continue
        if WRITER_MARK in name and name.startswith("."):
            # a writer's marker (no data): kept while its unrecorded version may be in flight
            owner = unrecorded_status.get(name[1:].rsplit(WRITER_MARK, 1)[0])
            out.append(_entry(path, "writer_marker", IN_FLIGHT if owner == IN_FLIGHT else REMOVABLE))
        elif is_temp_name(name):
            out.append(_entry(path, "index_temp" if path.is_dir() else "shard_temp", _temp_status(path, now, grace_s)))
        elif name.endswith(".parquet.dedup") and path.is_dir():
            owner = unrecorded_status.get(name.removesuffix(".dedup"))
            if owner == LIVE:
                out.append(_entry(path, "locate_index", LIVE))
            elif owner == IN_FLIGHT:
                out.append(_entry(path, "locate_index", IN_FLIGHT))
            else:
                out.append(_entry(path, "orphan_locate_index", REMOVABLE))
        else:
            out.append(_entry(path, "unknown_file", UNKNOWN))
    return out


def _saw_erased(path: Path, erased: set[str]) -> bool:
    """Whether an unrecorded checkpoint was trained on an erased record (its ``seen_ids``)."""
    if not erased:
        return False
    from shards.checkpoints import CheckpointStore

    try:
        payload = CheckpointStore(path.parent.parent).load(path.stem)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a torn file: kept and reported
        log.warning("unreadable checkpoint %s (%s): kept, reported as unknown", path, type(exc).__name__)
        return False
    return any(rid in erased for rid in payload.get("seen_ids") or [])


def _tombstone_kind(path: Path, root: Path, live: _Live) -> tuple[str, str]:
    if path.parent == root and path.suffix == ".npz" and path.stem in live.datasets:
        return "tombstones", LIVE
    return "unknown_file", UNKNOWN


def _manifest_kind(path: Path, root: Path, live: _Live) -> tuple[str, str]:
    if path in live.manifests:
        return "ensemble_manifest", LIVE
    return ("unrecorded_ensemble_manifest" if path.suffix == ".json" else "unknown_file"), UNKNOWN


def _report_kind(path: Path, root: Path, live: _Live) -> tuple[str, str]:
    parts = path.relative_to(root).parts
    if len(parts) == 2 and parts[0] in live.requests:
        return "request_report", LIVE
    return "unknown_file", UNKNOWN


def _spill_pid(name: str) -> int | None:
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "ingest" and parts[1].isdigit():
        return int(parts[1])
    return None


def _other_kind(path: Path, home: Path, live: _Live, database_files: tuple[Path, ...], now: float,
                grace_s: float) -> tuple[str, str]:
    if path.parent == home and path.name in KNOWN_ROOT_FILES:
        return "key", LIVE
    if path.parent == home and path.name == UP_STATE_FILE:
        return "service_state", LIVE
    if path in database_files:
        return "database", LIVE
    if database_files and is_lock_file(path, database_files[0]):
        return "database_lock", LIVE
    if is_temp_name(path.name):
        return "atomic_temp", _temp_status(path, now, grace_s)
    if path in live.sources:
        return "ingested_source_file", LIVE
    if path.name == "ground_truth.jsonl" and (path.parent / "records.jsonl") in live.sources:
        return "demo_ground_truth", LIVE  # the demo generator's answer key beside its ingested records
    return "unknown_file", UNKNOWN


def database_files(settings: Settings) -> tuple[Path, ...]:
    """The SQLite database file and its companions (none for PostgreSQL)."""
    url = settings.resolved_database_url
    if not url.startswith("sqlite"):
        return ()
    path = Path(url.split("///", 1)[1]).resolve()
    return tuple(Path(f"{path}{suffix}") for suffix in DATABASE_SUFFIXES)


# ---------------------------------------------------------------- the sweep


def _remove(entry: Entry) -> None:
    if entry.is_dir:
        shutil.rmtree(entry.path)
    else:
        entry.path.unlink()


def _catch_up_purges(settings: Settings, engine: Engine, report: SweepReport) -> None:
    """Superseded files that still hold erased records and that no erasure under way needs."""
    with unit_of_work(engine) as session:
        shards = session.execute(
            select(Record.dataset_id, Record.shard).where(Record.erased_in_shard_version.is_not(None)).distinct()
        ).all()
    for dataset_id, shard in sorted(shards):
        with unit_of_work(engine) as session:
            lock_shard(session, dataset_id, shard)
            blocker = shard_purge_blocked_by(session, dataset_id, shard, None)
            if blocker is not None:
                report.deferred_shards.append({"dataset_id": dataset_id, "shard": shard, "request_id": blocker})
                continue
            try:
                versions, checkpoints, _ = purge_shard_files(settings, session, dataset_id, shard, utcnow())
            except OSError as exc:
                report.errors.append({"kind": "superseded_files", "path": f"dataset {dataset_id} shard {shard}",
                                      "error": exc.strerror or type(exc).__name__})
                session.rollback()
                continue
            report.purged_superseded["shard_versions"] += len(versions)
            report.purged_superseded["checkpoints"] += len(checkpoints)


def sweep(settings: Settings, engine: Engine, *, request_id: str | None = None, grace_s: float = DEFAULT_GRACE_S,
          vacuum: bool | None = None, actor: str = ACTOR) -> SweepReport:
    """Remove the leftovers (see the module); record ``gc.swept``; then the database's
    maintenance (``vacuum``: None = when the request had samples, or always without a request)."""
    started = time.perf_counter()
    report = SweepReport()
    _catch_up_purges(settings, engine, report)
    databases = database_files(settings)
    with unit_of_work(engine) as session:
        datasets = {d.name: d.id for d in session.scalars(select(Dataset))}
        entries = classify_home(settings, session, grace_s=grace_s, database_files=databases)
    removable = [e for e in entries if e.status == REMOVABLE]
    for e in entries:
        if e.status == IN_FLIGHT:
            report.kept_in_flight[e.kind] = report.kept_in_flight.get(e.kind, 0) + 1
        elif e.status == UNKNOWN:
            report.unknown += 1
    # Shard files are removed under the shard's lock, re-checked there: an erasure may adopt one meanwhile.
    by_shard: dict[tuple[str, str], list[Entry]] = {}
    others: list[Entry] = []
    for e in removable:
        if settings.shards_dir in e.path.parents:
            dataset, shard_dir = e.path.relative_to(settings.shards_dir).parts[:2]
            by_shard.setdefault((dataset, shard_dir), []).append(e)
        else:
            others.append(e)
    for (dataset, shard_dir), group in sorted(by_shard.items()):
        dataset_id = datasets.get(dataset)
        shard = int(shard_dir.removeprefix("shard-")) if shard_dir.startswith("shard-") else None
        with unit_of_work(engine) as session:
            if dataset_id is not None and shard is not None:
                lock_shard(session, dataset_id, shard)
                again = {e.path: e for e in _classify_shard_dir(
                    settings.shards_dir / dataset / shard_dir, _live(session, settings),
                    ShardStore(settings.shards_dir), time.time(), grace_s)}
                group = [again[e.path] for e in group if e.path in again and again[e.path].status == REMOVABLE]
            _remove_all(group, report, settings.home)
    _remove_all(others, report, settings.home)
    _sweep_objects(settings, engine, report)
    had_samples = False
    with unit_of_work(engine) as session:
        if request_id is not None:
            request = session.get(ErasureRequest, str(request_id))
            had_samples = request is not None and request.sample_count > 0
        append_event(session, "gc.swept", report.audit_details(), actor=actor,
                     request_id=str(request_id) if request_id is not None else None)
    report.database = after_erasure(engine, vacuum=had_samples or request_id is None if vacuum is None else vacuum)
    report.seconds = time.perf_counter() - started
    for error in report.errors:
        log.error("gc could not remove %s (%s): %s", error["path"], error["kind"], error["error"])
    return report


def live_object_urls(session: Session) -> set[str]:
    """The objects live rows name (shard versions and checkpoints not purged, baselines,
    ensemble manifests, each dataset's current tombstones)."""
    named: set[str] = set()
    named.update(session.scalars(select(ShardVersion.path).where(ShardVersion.files_purged_at.is_(None))))
    named.update(session.scalars(select(ShardVersion.index_url).where(ShardVersion.files_purged_at.is_(None),
                                                                      ShardVersion.index_url.is_not(None))))
    named.update(session.scalars(select(Checkpoint.path).where(Checkpoint.file_purged_at.is_(None))))
    named.update(session.scalars(select(BaselineModel.path).where(BaselineModel.file_purged_at.is_(None))))
    named.update(session.scalars(select(EnsembleVersionRow.manifest_path)))
    named.update(session.scalars(select(Dataset.tombstones_url).where(Dataset.tombstones_url.is_not(None))))
    # the membership probe's plots (pipeline.membership.report_file)
    named.update(json.loads(details).get("report") or "" for details in session.scalars(select(MembershipProbe.details)))
    return {url for url in named if is_object_url(url)}


@dataclass(frozen=True)
class ObjectEntry:
    url: str
    kind: str  # object | orphan_object | purged_object
    status: str

    def to_dict(self) -> dict:
        return {"path": self.url, "kind": self.kind, "status": self.status}


def classify_objects(settings: Settings, session: Session) -> list[ObjectEntry]:
    """Every object in the store (none without a storage URL), with what it is: named by a live row;
    named only by purged rows (removable); named by nothing (removable once older than the grace
    period, before that possibly a writer's whose transaction has not committed yet)."""
    store = object_store(settings)
    if store is None:
        return []
    live = live_object_urls(session)
    purged: set[str] = set()
    purged.update(session.scalars(select(ShardVersion.path).where(ShardVersion.files_purged_at.is_not(None))))
    purged.update(session.scalars(select(ShardVersion.index_url).where(ShardVersion.files_purged_at.is_not(None),
                                                                       ShardVersion.index_url.is_not(None))))
    purged.update(session.scalars(select(Checkpoint.path).where(Checkpoint.file_purged_at.is_not(None))))
    purged.update(session.scalars(select(BaselineModel.path).where(BaselineModel.file_purged_at.is_not(None))))
    now = utcnow()
    entries = []
    for found in store.objects():
        if found.url in live:
            entries.append(ObjectEntry(found.url, "object", LIVE))
        elif found.url in purged:
            entries.append(ObjectEntry(found.url, "purged_object", REMOVABLE))
        else:
            young = (now - found.modified).total_seconds() < settings.storage_orphan_grace_s
            entries.append(ObjectEntry(found.url, "orphan_object", IN_FLIGHT if young else REMOVABLE))
    return entries


def _sweep_objects(settings: Settings, engine: Engine, report: SweepReport) -> None:
    """Delete the removable objects, each re-checked against the rows just before (a writer may have
    committed a row naming it meanwhile) and checked gone after."""
    store = object_store(settings)
    if store is None:
        return
    with unit_of_work(engine) as session:
        entries = classify_objects(settings, session)
    for e in entries:
        if e.status == IN_FLIGHT:
            report.kept_in_flight[e.kind] = report.kept_in_flight.get(e.kind, 0) + 1
    for e in (e for e in entries if e.status == REMOVABLE):
        with unit_of_work(engine) as session:
            if e.url in live_object_urls(session):
                continue
        if e.kind == "orphan_object" and store.age_seconds(e.url) < settings.storage_orphan_grace_s:
            continue  # uploaded again meanwhile (the same bytes): a writer may be about to commit its row
        try:
            store.delete(e.url)
        except OSError as exc:
            report.errors.append({"kind": e.kind, "path": e.url, "error": str(exc)})
            continue
        report.removed[e.kind] = report.removed.get(e.kind, 0) + 1


def _remove_all(entries: list[Entry], report: SweepReport, home: Path) -> None:
    for e in entries:
        try:
            _remove(e)
        except FileNotFoundError:
            continue  # gone meanwhile: nothing left to remove
        except OSError as exc:
            report.errors.append({"kind": e.kind, "path": _rel(e.path, home), "error": exc.strerror or type(exc).__name__})
            continue
        report.removed[e.kind] = report.removed.get(e.kind, 0) + 1

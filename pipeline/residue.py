"""The residue check: prove that an erased subject left nothing behind, without the erased text.

``check_residue(settings, engine, request_id)`` looks in four places and reports
hits by place (counts and record or event ids, never text):

(a) inventory: every file under the data home is accounted for by a live
    database row (shard version, locate index, tombstones, checkpoint, ensemble
    manifest, request report, ingested source file) or is a known key, config or
    database file (``pipeline.gc.classify_home``); anything else is an orphan;
(b) shards: every shard version file still on disk that a row names is read and
    its texts screened against the request's tombstones (keyed MinHash, the
    dataset's key) at the review threshold; a hit is a live record whose estimated
    Jaccard with an erased record reaches it (hits a reviewer decided to keep are
    counted apart);
(c) database: no unkeyed digest of the erased records (a ``content_sha256``
    column, or plain digests left), the request's samples purged, every audit
    event of the request within its kind's schema (ids, counts, enums, hashes) and
    no identifier of the subject or text of an erased record in the log or the
    request's history; SQLite: the write-ahead log truncated; PostgreSQL: dead
    tuples left in the sample tables;
(d) Prefect: the request's flow runs, their task runs, logs and artifacts, read
    through Prefect's API by a reader the entry point hands in
    (``flows.prefect_records``; the CLI and the API when ``PREFECT_API_URL`` is set,
    the flow's certify task always); without one, or when it fails, "not_checked",
    never "clean"; screened the same way.

"Screened" without the text: the request keeps its identifiers only as keyed
hashes and its erased records only as keyed MinHash tombstones, so a string is
checked by hashing its candidate tokens (e-mail addresses, words, digit runs,
two- and three-word names) with the same key and comparing with the request's
identifier hashes, and by the estimated Jaccard of its MinHash signature with
the request's tombstones.

It also lists the ingested source files that still hold the subject's rows
upstream (``db.upstream``): path, sha256, row numbers, open until an operator
marks them done.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import Engine, inspect, select

from db.audit import AuditEvent, append_event, check_details
from db.maintenance import dead_tuples, wal_size
from db.models import Dataset, ShardVersion
from db.requests import ErasureRequest, RequestEvent, RequestSample
from db.session import unit_of_work
from db.settings import Settings
from db.training import RequestMatch
from db.upstream import upstream_actions
from dedup.identifiers import keyed_hash
from dedup.policy import Thresholds
from dedup.tombstones import TombstoneSet
from pipeline.gc import IN_FLIGHT, LIVE, REMOVABLE, UNKNOWN, Entry, classify_home, classify_objects, database_files
from pipeline.lifecycle import get_request, identifier_hashes
from pipeline.locate import load_tombstones
from pipeline.object_store import is_object_url, shard_file

ACTOR = "audit:residue"
PREFECT_CLEAN, PREFECT_HITS, PREFECT_NOT_CHECKED = "clean", "hits", "not_checked"

# A match may start only where a token starts (the look-behind), so a long run without an "@"
# costs linear time, not O(n^2) failed attempts; the matches are the plain pattern's
# (``[^\s@<>"'(),;:]+@[^\s@<>"'(),;:]+\.[A-Za-z]{2,}``), tested against it.
_EMAIL = re.compile(r"(?<![^\s@<>\"'(),;:])[^\s@<>\"'(),;:]++@[^\s@<>\"'(),;:]+\.[A-Za-z]{2,}")
# No match of _EMAIL holds one of these: the text is split on them first, and only the pieces
# holding an "@" are searched (a Prefect artifact's inline base64 image, 70 KB, is skipped whole).
_EMAIL_DELIMITERS = re.compile(r"[\s<>\"'(),;:]+")
_WORD = re.compile(r"[\w.+-]+", re.UNICODE)
_DIGITS = re.compile(r"\+?[\d][\d ()./-]{5,}\d")


def email_candidates(text: str) -> list[str]:
    """``_EMAIL.findall(text)``, in linear time (see ``_EMAIL_DELIMITERS``)."""
    return [m for piece in _EMAIL_DELIMITERS.split(text) if "@" in piece for m in _EMAIL.findall(piece)]


# ---------------------------------------------------------------- screening strings without the text


@dataclass(frozen=True)
class SubjectScreen:
    """The request's identifier hashes and tombstones, to screen strings with."""

    key: bytes
    identifiers: frozenset[tuple[str, str]]  # (kind, keyed hash)
    tombstones: tuple[TombstoneSet, ...]  # the request's only, one set per dataset (each under its own key)
    min_jaccard: float

    # (kind, candidate value) -> its (kind, keyed hash), None when not a valid value of the kind: a Prefect
    # run's records repeat the same parameters and names many times, and each candidate costs an HMAC
    _digests: dict[tuple[str, str], tuple[str, str] | None] = field(default_factory=dict, compare=False, repr=False)

    def identifier_hits(self, text: str) -> int:
        """How many of the subject's identifiers occur in ``text`` (by keyed hash of candidate tokens)."""
        kinds = {kind for kind, _ in self.identifiers}
        candidates: set[tuple[str, str]] = set()
        if "email" in kinds:
            candidates |= {("email", m) for m in email_candidates(text)}
        words = _WORD.findall(text)
        if "user_id" in kinds:
            candidates |= {("user_id", w) for w in words}
        if "phone" in kinds:
            candidates |= {("phone", m) for m in _DIGITS.findall(text)}
        if "name" in kinds:
            candidates |= {("name", " ".join(words[i:i + n])) for n in (1, 2, 3) for i in range(len(words) - n + 1)}
        found = set()
        for candidate in candidates:
            if candidate not in self._digests:
                self._digests[candidate] = self._digest_of(*candidate)
            digest = self._digests[candidate]
            if digest in self.identifiers:
                found.add(digest)
        return len(found)

    def _digest_of(self, kind: str, value: str) -> tuple[str, str] | None:
        try:
            return kind, keyed_hash(self.key, kind, value)
        except ValueError:  # not a valid value of that kind (e.g. too few digits)
            return None

    def tombstone_hits(self, texts: Sequence[str]) -> list[tuple[int, str, float]]:
        """(text index, tombstone key, estimated Jaccard) of texts near an erased record."""
        if not texts:
            return []
        return [(h.text_index, h.key, float(h.estimated_jaccard))
                for tombstones in self.tombstones if len(tombstones)
                for h in tombstones.screen(list(texts), self.min_jaccard)]

    def screen_strings(self, strings: Sequence[str]) -> list[int]:
        """Indexes of the strings holding an identifier of the subject or an erased record's text."""
        first: dict[str, int] = {}
        for i, s in enumerate(strings):
            first.setdefault(s, i)
        hit_texts = {s for s in first if self.identifier_hits(s)}
        hit = {i for i, s in enumerate(strings) if s in hit_texts}
        hit |= {i for i, _, _ in self.tombstone_hits([s for s in strings])}
        return sorted(hit)


def _request_tombstones(settings: Settings, datasets: Iterable[str], request_id: str) -> dict[str, TombstoneSet]:
    """Per dataset: the tombstones this request left (keys ``<request>/<shard>/<record>``)."""
    out = {}
    for name in datasets:
        tombstones = load_tombstones(settings, name)
        if tombstones is None:
            continue
        rows = [i for i, key in enumerate(tombstones.keys) if key.startswith(f"{request_id}/")]
        out[name] = TombstoneSet(tombstones.minhash, tombstones.signatures[rows], tuple(tombstones.keys[i] for i in rows))
    return out


def _strings_of(value: object) -> list[str]:
    """Every string inside a JSON-like value (keys included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings_of(k) + _strings_of(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings_of(v)]
    return []


# ---------------------------------------------------------------- the check


def check_residue(settings: Settings, engine: Engine, request_id: str, *,
                  prefect_records: PrefectReader | None = None, record_event: bool = True) -> dict:
    """The residue report of one request (see the module). ``prefect_records`` reads
    Prefect's records of the request's runs (``flows.prefect_records.request_run_records``);
    without it Prefect is "not_checked". Appends ``residue.checked``."""
    started = time.perf_counter()
    key = settings.secret_key_bytes()
    with unit_of_work(engine) as session:
        request = get_request(session, request_id)
        request_id = request.id
        matches = list(session.scalars(select(RequestMatch).where(RequestMatch.request_id == request_id)))
        datasets = {d.id: d.name for d in session.scalars(select(Dataset))}
        touched = sorted({datasets[m.dataset_id] for m in matches})
        identifiers = frozenset(identifier_hashes(session, request_id))
        state = request.state
    tombstones = _request_tombstones(settings, touched, request_id)
    review = Thresholds().jaccard_review
    screens = {name: SubjectScreen(key, identifiers, (t,), review) for name, t in tombstones.items()}
    any_screen = SubjectScreen(key, identifiers, tuple(tombstones.values()), review)

    inventory = _inventory(settings, engine)
    shards = _shards(settings, engine, screens, matches, datasets)
    database = _database(engine, request_id, matches, any_screen)
    prefect_result = _prefect(request_id, any_screen, prefect_records)
    with unit_of_work(engine) as session:
        upstream = [a.to_dict() for a in upstream_actions(session, [request_id])]
    clean = (not inventory["orphan_count"] and not shards["unresolved"] and not database["hits"]
             and prefect_result["status"] != PREFECT_HITS)
    report = {
        "request_id": request_id, "state": state, "clean": clean,
        "complete": prefect_result["status"] != PREFECT_NOT_CHECKED,
        "summary": {"orphans": inventory["orphan_count"], "shard_hits": shards["hit_count"],
                    "shard_hits_unresolved": shards["unresolved"], "database_hits": database["hits"],
                    "prefect": prefect_result["status"],
                    "upstream_open": sum(a["open"] for a in upstream)},
        "inventory": inventory, "shards": shards, "database": database, "prefect": prefect_result,
        "upstream": upstream,
        "tombstones": {name: len(t) for name, t in sorted(tombstones.items())},
        "seconds": round(time.perf_counter() - started, 3),
    }
    if record_event:
        with unit_of_work(engine) as session:
            append_event(session, "residue.checked", {
                "clean": clean, "orphans": inventory["orphan_count"], "shard_hits": shards["unresolved"],
                "database_hits": database["hits"], "prefect": prefect_result["status"],
                "upstream_open": report["summary"]["upstream_open"]}, actor=ACTOR, request_id=request_id)
    return report


# (a) ----------------------------------------------------------------


def _inventory(settings: Settings, engine: Engine) -> dict:
    with unit_of_work(engine) as session:
        entries = classify_home(settings, session, database_files=database_files(settings))
        objects = classify_objects(settings, session)  # the shared store's objects (none without one)
    # a writer marker names only a host and a PID (shards.store): not an orphan of data
    orphans = [e for e in entries if e.status != LIVE and e.kind != "writer_marker"]
    orphans += [o for o in objects if o.status != LIVE]
    return {
        "files": len(entries) + len(objects),
        "by_kind": dict(sorted(Counter(e.kind for e in [*entries, *objects]).items())),
        "orphan_count": len(orphans),
        "orphans": [e.to_dict(settings.home) if isinstance(e, Entry) else e.to_dict() for e in orphans],
        "orphans_by_status": {s: sum(e.status == s for e in orphans) for s in (REMOVABLE, IN_FLIGHT, UNKNOWN)},
    }


# (b) ----------------------------------------------------------------


def _shards(settings: Settings, engine: Engine, screens: dict[str, SubjectScreen], matches: list[RequestMatch],
            datasets: dict[int, str]) -> dict:
    kept = {(m.dataset_id, m.record_id) for m in matches if m.final_decision == "keep"}
    with unit_of_work(engine) as session:
        versions = [v for v in session.scalars(select(ShardVersion).where(ShardVersion.files_purged_at.is_(None))
                                               .order_by(ShardVersion.dataset_id, ShardVersion.shard,
                                                         ShardVersion.version))
                    if datasets[v.dataset_id] in screens]
    hits: list[dict] = []
    screened = 0
    for version in versions:
        if is_object_url(version.path):  # the shared store: read the object itself (verified)
            file = shard_file(settings, version, datasets[version.dataset_id])
        elif not os.path.exists(version.path):
            continue
        else:
            file = Path(version.path)
        table = pq.read_table(file, columns=["record_id", "text"])
        texts = table["text"].to_pylist()
        record_ids = table["record_id"].to_pylist()
        screened += len(texts)
        best: dict[int, tuple[str, float]] = {}
        for index, tombstone_key, jaccard in screens[datasets[version.dataset_id]].tombstone_hits(texts):
            if index not in best or jaccard > best[index][1]:
                best[index] = (tombstone_key, jaccard)
        for index, (tombstone_key, jaccard) in sorted(best.items()):
            hits.append({"dataset": datasets[version.dataset_id], "shard": version.shard, "version": version.version,
                         "record_id": record_ids[index], "erased_record_id": tombstone_key.split("/", 2)[-1],
                         "estimated_jaccard": round(jaccard, 3),
                         "kept_by_review": (version.dataset_id, record_ids[index]) in kept})
    unresolved = sum(not h["kept_by_review"] for h in hits)
    return {"versions_screened": len(versions), "records_screened": screened,
            "review_jaccard": Thresholds().jaccard_review, "hit_count": len(hits), "unresolved": unresolved,
            "hits": hits, "datasets": sorted(screens)}


# (c) ----------------------------------------------------------------


def _database(engine: Engine, request_id: str, matches: list[RequestMatch], screen: SubjectScreen) -> dict:
    erased = [(m.dataset_id, m.record_id) for m in matches if m.erased_in_shard_version is not None]
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("records")}
    plain_digest_column = "content_sha256" in columns
    with unit_of_work(engine) as session:
        plain_digests = 0
        if plain_digest_column and erased:
            from sqlalchemy import column, table, tuple_

            records = table("records", column("dataset_id"), column("record_id"), column("content_sha256"))
            for start in range(0, len(erased), 500):
                chunk = erased[start:start + 500]
                plain_digests += len(session.execute(select(records.c.record_id).where(
                    tuple_(records.c.dataset_id, records.c.record_id).in_(chunk),
                    records.c.content_sha256.is_not(None))).all())
        samples_left = len(session.scalars(select(RequestSample.id).where(RequestSample.request_id == request_id)).all())
        request = session.get(ErasureRequest, request_id)
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id)
                                      .order_by(AuditEvent.id)))
        history = list(session.scalars(select(RequestEvent).where(RequestEvent.request_id == request_id)
                                       .order_by(RequestEvent.id)))
    off_schema, text_hits = [], []
    for event in events:
        details = json.loads(event.details)
        try:
            check_details(event.kind, details)
        except ValueError:
            off_schema.append(event.id)
        if screen.screen_strings(_strings_of(details) + [event.actor]):
            text_hits.append(event.id)
    history_hits = [e.id for e in history
                    if screen.screen_strings([s for s in (getattr(e, "reason", None), e.actor) if s])]
    closed = request is not None and request.state in ("completed", "denied")
    wal = _sqlite_wal(engine, screen)
    hits = (plain_digests + len(off_schema) + len(text_hits) + len(history_hits) + (1 if closed and samples_left else 0)
            + (wal["hits"] if wal else 0))
    return {
        "backend": engine.dialect.name,
        "hits": hits,
        "unkeyed_content_digest": {"column_present": plain_digest_column, "erased_records_with_plain_digest":
                                   plain_digests},
        "samples": {"left": samples_left, "purged_at": request.samples_purged_at.isoformat()
                    if request is not None and request.samples_purged_at else None},
        "audit_log": {"events": len(events), "outside_schema": off_schema, "with_subject_text": text_hits},
        "request_history": {"events": len(history), "with_subject_text": history_hits},
        "sqlite_wal": wal,
        "postgres_dead_tuples": dead_tuples(engine),
    }


_PRINTABLE = re.compile(rb"[\x20-\x7e\x80-\xff]{12,}")


def _sqlite_wal(engine: Engine, screen: SubjectScreen) -> dict | None:
    """SQLite's write-ahead log: its size (0 once truncated) and its readable strings screened.
    After the completion's TRUNCATE checkpoint the log holds only later writes (certificate,
    audit events), and with ``secure_delete`` their pages hold no deleted row's bytes."""
    size = wal_size(engine)
    if size is None:
        return None
    strings: list[str] = []
    if size:
        from db.maintenance import sqlite_path

        data = open(f"{sqlite_path(engine)}-wal", "rb").read()
        strings = [m.decode("utf-8", "ignore") for m in _PRINTABLE.findall(data)]
    hits = len(screen.screen_strings(strings)) if strings else 0
    return {"bytes": size, "truncated": size == 0, "strings_screened": len(strings), "hits": hits}


# (d) ----------------------------------------------------------------


def _not_checked(reason: str) -> dict:
    return {"status": PREFECT_NOT_CHECKED, "reason": reason, "flow_runs": 0, "hits": []}


PrefectReader = Callable[[str], list[dict]]  # flows.prefect_records.request_run_records


def _prefect(request_id: str, screen: SubjectScreen, reader: PrefectReader | None) -> dict:
    """Prefect's records of the request's runs (from ``reader``: the service layer never
    imports Prefect), screened; "not_checked" when there is no reader or it fails."""
    if reader is None:
        return _not_checked("no Prefect API to read (PREFECT_API_URL is not set)")
    try:
        places = reader(request_id)
    except Exception as exc:  # noqa: BLE001 - any failure to read Prefect means "not checked", never "clean"
        return _not_checked(f"Prefect API not readable ({type(exc).__name__})")
    if not places:
        return _not_checked("no flow run of this request on the Prefect server")
    hit_places = [p for p in places if screen.screen_strings(p["strings"])]
    return {"status": PREFECT_HITS if hit_places else PREFECT_CLEAN,
            "flow_runs": sum(p["place"] == "flow_run" for p in places),
            "records_read": dict(sorted(Counter(p["place"] for p in places).items())),
            "hits": [{"place": p["place"], "id": p["id"]} for p in hit_places]}


def check_residue_for(settings: Settings, request_id: str, *, prefect_records: PrefectReader | None = None) -> dict:
    """``check_residue`` with its own engine (for the CLI)."""
    from pipeline.database import open_database

    engine = open_database(settings)
    try:
        return check_residue(settings, engine, request_id, prefect_records=prefect_records)
    finally:
        engine.dispose()


# ---------------------------------------------------------------- upstream actions


def mark_upstream_done(session, request_id: str, source_sha256: str, *, actor: str) -> dict:  # noqa: ANN001
    """An operator deleted the subject's rows from an ingested source file upstream: close
    that action (LookupError when the request has no such source file; a second mark is a no-op)."""
    from db.models import utcnow
    from db.upstream import UpstreamActionDone

    request = get_request(session, request_id)
    sha = source_sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError("--source is the sha256 of the source file (64 hex digits), as `erasure audit residue` lists it")
    actions = [a for a in upstream_actions(session, [request.id]) if a.sha256 == sha]
    if not actions:
        raise LookupError(f"request {request.id} has no erased record from a source file with sha256 {sha}")
    done = []
    for action in actions:
        if action.open:
            session.add(UpstreamActionDone(request_id=request.id, source_file_id=action.source_file_id,
                                           done_at=utcnow(), done_by=actor))
            session.flush()
            append_event(session, "upstream.done", {"source_file_id": action.source_file_id,
                                                    "source_sha256": action.sha256, "rows": len(action.rows)},
                         actor=actor, request_id=request.id)
        done.append(action.source_file_id)
    return {"request_id": request.id, "source_sha256": sha, "source_file_ids": done,
            "actions": [a.to_dict() for a in upstream_actions(session, [request.id])]}


def residue_for_certificate(settings: Settings, engine: Engine, request_id: str, *,
                            prefect_records: PrefectReader | None = None) -> dict | None:
    """The residue check's result for the certificate of a completed request not yet certified
    (None otherwise): the summary, counts and ids by place, and the upstream actions. Run it
    outside the certificate's transaction (it reads files, may ask Prefect, and records an event)."""
    from db.audit import Certificate

    with unit_of_work(engine) as session:
        request = get_request(session, request_id)
        if request.state != "completed" or session.get(Certificate, request.id) is not None:
            return None
    report = check_residue(settings, engine, request_id, prefect_records=prefect_records)
    shards, db, prefect, inventory = report["shards"], report["database"], report["prefect"], report["inventory"]
    return {
        "clean": report["clean"], "complete": report["complete"], "summary": report["summary"],
        "inventory": {"files": inventory["files"], "orphans": inventory["orphan_count"],
                      "orphans_by_status": inventory["orphans_by_status"]},
        "shards": {k: shards[k] for k in ("versions_screened", "records_screened", "review_jaccard", "hit_count",
                                          "unresolved")}
                  | {"hit_record_ids": sorted({h["record_id"] for h in shards["hits"]})},
        "database": {k: db[k] for k in ("backend", "hits", "unkeyed_content_digest", "samples", "sqlite_wal")},
        "prefect": {"status": prefect["status"], "flow_runs": prefect["flow_runs"], "hits": len(prefect["hits"]),
                    **({"reason": prefect["reason"]} if prefect.get("reason") else {})},
        "upstream_actions": [{k: a[k] for k in ("source_file_id", "path", "sha256", "rows", "row_count", "open")}
                             for a in report["upstream"]],
        "method": "without the erased text: keyed hashes of candidate tokens against the request's identifier "
                  "hashes, keyed MinHash against its tombstones at the review Jaccard",
    }

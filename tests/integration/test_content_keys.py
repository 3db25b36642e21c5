"""No confirmation oracle for erased content (issue 10, point 1), on both backends:
content digests are keyed HMACs, tombstones are keyed MinHash signatures, data from
before (migration 0006) is brought under the key by the next ingest or
``erasure db rekey``, and an old unkeyed tombstone file is refused until dropped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from sqlalchemy import select, text, update
from typer.testing import CliRunner

from db.audit import AuditEvent
from db.models import Record
from db.session import alembic_config, unit_of_work, upgrade_to_head
from db.settings import Settings, use_settings
from dedup.identifiers import content_hmac
from dedup.minhash import MinHashParams, estimate_jaccard, minhash_signatures
from dedup.shard_index import ShardIndex
from dedup.tombstones import TombstoneSet
from pipeline.database import open_database
from pipeline.ingest import IngestOptions, IngestValidationError, ingest_source_file
from pipeline.locate import UnkeyedTombstoneFile, dataset_minhash, load_tombstones, tombstone_path
from shards.sources import FieldMap
from shards.store import ShardStore
from tests.conftest import database_dump

FIELDS = FieldMap(identifier_fields=(("email", "email"),))
OPTIONS = IngestOptions(dataset="shop", fields=FIELDS, n_shards=2, n_slices=2)
SUBJECT = "jane.subject@example.org"


def _rows(n: int, start: int = 0) -> list[dict]:
    topics = ["parcel", "invoice", "warranty", "delivery", "refund", "account", "password", "voucher"]
    return [{"id": f"rec-{i:04d}", "label": i % 2, "email": f"p{i}@example.org",
             "text": f"customer {i} wrote about the {topics[i % 8]} number {i * 13} that went wrong twice "
                     f"in week {i % 52} and asked for help with order {i * 7} before friday"}
            for i in range(start, start + n)]


def _subject_rows() -> list[dict]:
    return [{"id": f"jane-{i}", "label": 1, "email": SUBJECT,
             "text": f"jane here again, my cat {name} knocked the blue vase off the shelf and I need a new "
                     f"one delivered to the flat on elm street number {i + 4} before the weekend please"}
            for i, name in enumerate(["miso", "tofu", "pickle"])]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _plain(texts) -> list[str]:  # noqa: ANN001
    return [hashlib.sha256(t.encode()).hexdigest() for t in texts]


def _erase_subject(settings: Settings) -> str:
    """An identifier-only request for the subject, located and erased through the service layer."""
    from pipeline.lifecycle import submit_request
    from pipeline.processing import decide_after_locating, erase_records, locate_and_record, start_processing

    engine = open_database(settings)
    request_id = submit_request(engine, settings.secret_key_bytes(), idempotency_key="content-keys",
                                identifiers=[("email", SUBJECT)], samples=[], actor="cli:test").request_id
    with use_settings(settings):
        start_processing(request_id)
        assert locate_and_record(request_id, "shop")["erase"] == 3
        assert decide_after_locating(request_id)["state"] == "erasing"
        erased = erase_records(request_id, "shop")
    assert sum(s["erased"] for s in erased["shards"]) == 3, erased
    return str(request_id)


def test_erasure_keeps_only_keyed_digests_and_keyed_tombstones(settings: Settings, tmp_path: Path) -> None:
    rows, subject = _rows(40), _subject_rows()
    ingest_source_file(_write(tmp_path / "a.jsonl", rows + subject), OPTIONS, settings)
    key = settings.secret_key_bytes()
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        stored = dict(session.execute(select(Record.record_id, Record.content_hmac)).all())
    assert stored == {r["id"]: content_hmac(key, r["text"]) for r in rows + subject}

    request_id = _erase_subject(settings)

    # no plain SHA-256 of any text anywhere in the database; the erased records keep only their HMAC
    dump = database_dump(settings.resolved_database_url)
    assert not [d for d in _plain(r["text"] for r in rows + subject) if d in dump]
    with unit_of_work(engine) as session:
        erased = dict(session.execute(select(Record.record_id, Record.content_hmac)
                                      .where(Record.erased_in_shard_version.is_not(None))).all())
    assert erased == {r["id"]: content_hmac(key, r["text"]) for r in subject}

    # the tombstones are keyed: the file names the key's fingerprint, and a signature of the guessed
    # text computed without the key (datasketch's seeded parameters) matches none of them
    path = tombstone_path(settings, "shop")
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        signatures = np.array(data["signatures"])
    assert meta["format"] == 2 and meta["minhash"]["key_id"] == dataset_minhash(settings, "shop").key_id
    assert key.hex() not in path.read_bytes().hex() and key not in path.read_bytes()
    for guess in _subject_rows():
        assert estimate_jaccard(minhash_signatures([guess["text"]], MinHashParams())[0], signatures).max() < 0.05
    tombstones = load_tombstones(settings, "shop")
    assert len(tombstones) == 3 and {k.split("/")[0] for k in tombstones.keys} == {request_id}

    # the key holder still screens: the erased texts come back (new ids, lightly edited) and are refused
    back = [{**r, "id": f"again-{i}", "text": r["text"].upper() + " thanks"} for i, r in enumerate(subject)]
    fresh = _rows(5, start=100)
    summary = ingest_source_file(_write(tmp_path / "b.jsonl", back + fresh), OPTIONS, settings)
    assert summary.screened_out == 3 and summary.new_records == 5
    assert {s["record_id"] for s in summary.screened} == {"again-0", "again-1", "again-2"}
    # a re-ingest of the erased ids themselves is skipped (same text) or refused (another text)
    again = ingest_source_file(_write(tmp_path / "c.jsonl", subject), OPTIONS, settings)
    assert again.new_records == 0 and again.skipped_existing == 3
    with pytest.raises(IngestValidationError, match="different text"):
        ingest_source_file(_write(tmp_path / "d.jsonl", [{**subject[0], "text": "another text entirely here"}]),
                           OPTIONS, settings)
    with unit_of_work(engine) as session:
        events = [json.loads(e.details) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "dataset.ingested"))]
    assert [e["tombstones_hit"] for e in events] == [[], [request_id], []]


def _as_before_migration_0006(settings: Settings, rows: list[dict], erased_id: str) -> None:
    """The database as the code before 0006 left it: plain SHA-256 digests, one record erased."""
    url = settings.resolved_database_url
    command.downgrade(alembic_config(url), "0005")
    from db.session import make_engine

    raw = make_engine(url)
    try:
        with raw.begin() as conn:
            for r in rows:
                conn.execute(text("UPDATE records SET content_sha256 = :d WHERE record_id = :r"),
                             {"d": hashlib.sha256(r["text"].encode()).hexdigest(), "r": r["id"]})
            conn.execute(text("UPDATE records SET erased_in_shard_version = 99 WHERE record_id = :r"),
                         {"r": erased_id})
    finally:
        raw.dispose()


def test_migration_drops_plain_digests_and_the_next_ingest_rekeys_live_records(
        settings: Settings, tmp_path: Path) -> None:
    rows = _rows(30)
    ingest_source_file(_write(tmp_path / "a.jsonl", rows), OPTIONS, settings)
    erased_id = rows[0]["id"]
    _as_before_migration_0006(settings, rows, erased_id)
    assert _plain([rows[1]["text"]])[0] in database_dump(settings.resolved_database_url)  # the oracle, before

    upgrade_to_head(settings.resolved_database_url)
    dump = database_dump(settings.resolved_database_url)
    assert not [d for d in _plain(r["text"] for r in rows) if d in dump]  # every plain digest is gone
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        assert set(session.scalars(select(Record.content_hmac))) == {None}

    # the next ingest holds the key: live records get their HMAC from the shard files; the erased one stays NULL
    summary = ingest_source_file(_write(tmp_path / "b.jsonl", _rows(5, start=200)), OPTIONS, settings)
    assert summary.new_records == 5
    key = settings.secret_key_bytes()
    with unit_of_work(engine) as session:
        stored = dict(session.execute(select(Record.record_id, Record.content_hmac)).all())
    assert stored[erased_id] is None
    assert all(stored[r["id"]] == content_hmac(key, r["text"]) for r in rows[1:] + _rows(5, start=200))
    # a re-ingest of the erased id cannot be compared any more: it is skipped, never brought back
    again = ingest_source_file(_write(tmp_path / "c.jsonl", [{**rows[0], "text": "changed text of it"}]),
                               OPTIONS, settings)
    assert again.new_records == 0 and again.skipped_existing == 1
    # the live ones are compared under the key again
    with pytest.raises(IngestValidationError, match="different text"):
        ingest_source_file(_write(tmp_path / "d.jsonl", [{**rows[1], "text": "changed text of it"}]),
                           OPTIONS, settings)


def _unkeyed_tombstone_file(settings: Settings, texts: list[str]) -> Path:
    """A tombstone file as the code before keyed signatures wrote it (format 1, seeded parameters)."""
    params = MinHashParams()
    path = tombstone_path(settings, "shop")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, signatures=minhash_signatures(texts, params), keys=np.array([f"old/{i}" for i in range(len(texts))]),
                 meta=np.array(json.dumps({"format": 1, "minhash": params.to_dict()})))
    return path


def test_rekey_upgrades_indexes_and_drops_unkeyed_tombstones_only_when_told(
        settings: Settings, tmp_path: Path) -> None:
    from api.cli import app

    rows = _rows(30)
    ingest_source_file(_write(tmp_path / "a.jsonl", rows), OPTIONS, settings)
    store = ShardStore(settings.shards_dir)
    # indexes from before keyed signatures (seeded MinHash parameters)
    from pipeline.locate import build_and_save_index, dataset_embedder

    embedder = dataset_embedder("hashing", 256)
    for shard in range(2):
        build_and_save_index(store.latest("shop", shard), embedder, MinHashParams(), overwrite=True)
    _unkeyed_tombstone_file(settings, [r["text"] for r in rows[:2]])

    # ingest and screening refuse the unkeyed file, before writing anything
    versions = [len(store.versions("shop", s)) for s in range(2)]
    with pytest.raises(UnkeyedTombstoneFile, match="--drop-unkeyed-tombstones"):
        ingest_source_file(_write(tmp_path / "b.jsonl", _rows(3, start=300)), OPTIONS, settings)
    assert [len(store.versions("shop", s)) for s in range(2)] == versions
    assert not list((settings.home / "tmp").glob("ingest-*"))
    from pipeline.screening import screen_texts

    with pytest.raises(UnkeyedTombstoneFile):
        screen_texts(settings, "shop", [rows[0]["text"]])

    args = ["db", "rekey", "--home", str(settings.home), "--database-url", settings.database_url, "--json"]
    refused = CliRunner().invoke(app, args, env={"ERASURE_SECRET_KEY": settings.secret_key.get_secret_value()})
    assert refused.exit_code == 2 and "2 unkeyed tombstones" in refused.output, refused.output
    assert tombstone_path(settings, "shop").exists()

    done = CliRunner().invoke(app, [*args, "--drop-unkeyed-tombstones"],
                              env={"ERASURE_SECRET_KEY": settings.secret_key.get_secret_value()})
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"datasets": [{"dataset": "shop", "records_rekeyed": 0, "indexes_rebuilt": 2,
                                                     "unkeyed_tombstones_dropped": 2}]}
    assert not tombstone_path(settings, "shop").exists()
    keyed = dataset_minhash(settings, "shop")
    for shard in range(2):
        assert ShardIndex.load(store.latest("shop", shard).path).minhash == keyed
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.kind == "dataset.rekeyed")).one()
    assert json.loads(event.details)["unkeyed_tombstones_dropped"] == 2
    # a second run has nothing left to do
    twice = CliRunner().invoke(app, args, env={"ERASURE_SECRET_KEY": settings.secret_key.get_secret_value()})
    assert json.loads(twice.stdout)["datasets"][0]["indexes_rebuilt"] == 0
    # and ingest screens against (new, keyed) tombstones again
    assert ingest_source_file(_write(tmp_path / "b.jsonl", _rows(3, start=300)), OPTIONS, settings).new_records == 3


def test_rekey_leaves_no_plain_digest_in_the_sqlite_files(sqlite_settings: Settings, tmp_path: Path) -> None:
    """SQLite keeps overwritten values in the WAL and free pages: rekey checkpoints and vacuums."""
    from pipeline.rekey import rekey_dataset

    settings = sqlite_settings
    rows = _rows(30)
    ingest_source_file(_write(tmp_path / "a.jsonl", rows), OPTIONS, settings)
    _as_before_migration_0006(settings, rows, rows[0]["id"])
    upgrade_to_head(settings.resolved_database_url)
    report = rekey_dataset(settings, "shop")
    assert report.records_rekeyed == 29
    db_file = Path(settings.resolved_database_url.split("///", 1)[1])
    raw = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))
    assert not [d for d in _plain(r["text"] for r in rows) if d.encode() in raw]
    with unit_of_work(open_database(settings)) as session:
        session.execute(update(Record).values(shard=Record.shard))  # still a working database

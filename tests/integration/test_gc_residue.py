"""The sweep and the residue check on real files and both backends: leftovers of killed
processes are removed and live files kept; a non-matching leftover shard version is
not kept forever; a failed sibling request does not block a purge; the SQLite WAL
holds no sample after completion and PostgreSQL's sample table is rewritten; the
residue check finds what is planted and nothing after a clean erasure; upstream
actions stay open until marked done."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, text

from db.audit import AuditEvent
from db.lineage import add_shard_version, latest_shard_versions
from db.models import Dataset, ShardVersion
from db.session import unit_of_work
from db.settings import Settings, use_settings
from db.training import RequestMatch
from pipeline.database import open_database
from pipeline.ingest import IngestOptions, ingest_source_file
from shards.demo_data import write_demo
from shards.sources import FieldMap
from shards.store import ShardStore
from tests.prefect_server import demo_subject

ROOT = Path(__file__).resolve().parents[2]
FIELDS = FieldMap(identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")))


def _ingest(settings: Settings, records: int = 400) -> dict:
    files = write_demo(settings.home.parent / "input", records, seed=0)
    ingest_source_file(files.records, IngestOptions(dataset="demo", fields=FIELDS, n_shards=2, n_slices=2),
                       settings)
    return {"files": files, "subject": demo_subject(files.ground_truth)}


def _dead_pid() -> int:
    """The PID of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _killed_writer(settings: Settings, body: str) -> None:
    """Run ``body`` in a child process (``store``, ``settings`` at hand) that SIGKILLs itself where it says."""
    script = textwrap.dedent("""
        import os, signal
        from db.settings import Settings
        from shards.store import ShardStore
        settings = Settings(home={home!r}, database_url={url!r}, secret_key="test-secret-key-not-for-production-0123456789")
        store = ShardStore(settings.shards_dir)
        def die(*_):
            os.kill(os.getpid(), signal.SIGKILL)
    """).format(home=str(settings.home), url=settings.resolved_database_url) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def _events(settings: Settings, kind: str) -> list[dict]:
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return [json.loads(e.details) for e in session.scalars(select(AuditEvent).where(AuditEvent.kind == kind))]
    finally:
        engine.dispose()


def _process(settings: Settings, request_id: str) -> dict:
    """One request through the service layer, as the flow orders it (no Prefect)."""
    from pipeline import processing

    with use_settings(settings):
        processing.start_processing(request_id)
        for name in processing.datasets_to_process(request_id):
            processing.locate_and_record(request_id, name)
        if processing.decide_after_locating(request_id)["state"] == "awaiting_review":
            processing.apply_review_timeout(request_id, "erase")
        for name in processing.datasets_to_process(request_id):
            processing.erase_records(request_id, name)
        processing.finish_erasing(request_id)
        verified = processing.verify_and_complete(request_id)
        processing.certify(request_id)
        return verified


def _submit(settings: Settings, identifiers: list[tuple[str, str]], samples: list[str], key: str) -> str:
    from pipeline.lifecycle import submit_request

    engine = open_database(settings)
    try:
        return submit_request(engine, settings.secret_key_bytes(), idempotency_key=key, identifiers=identifiers,
                              samples=samples, actor="test").request_id
    finally:
        engine.dispose()


# ---------------------------------------------------------------- the sweep


def test_sweep_removes_what_killed_processes_left_and_keeps_live_files(settings: Settings) -> None:
    from pipeline.gc import sweep

    _ingest(settings)
    store = ShardStore(settings.shards_dir)
    shard_dir = store.shard_dir("demo", 0)
    live_before = sorted(p for p in settings.shards_dir.rglob("*") if p.is_file() and ".writer-" not in p.name)
    # killed while writing a shard version: its .tmp-PID file stays
    _killed_writer(settings, """
        store.write_version("demo", 0, store.read("demo", 0), _before_publish=die)
    """)
    # killed after writing a whole version and its indexes, before recording it (an ingest's window)
    _killed_writer(settings, """
        from pipeline.locate import build_and_save_index, dataset_embedder, dataset_minhash
        ref = store.write_version("demo", 1, store.read("demo", 1))
        build_and_save_index(ref, dataset_embedder("hashing", 256), dataset_minhash(settings, "demo"))
        die()
    """)
    dead = _dead_pid()
    index_tmp = shard_dir / f"v000001.parquet.dedup.tmp-{dead}.k2j3h4g5"
    index_old = shard_dir / f"v000001.parquet.dedup.old-{dead}.a1b2c3d4"
    spill = settings.home / "tmp" / f"ingest-{dead}-0badc0de"
    atomic = settings.home / "tombstones" / f".demo.npz.tmp-{dead}.x8y7z6w5"
    legacy = settings.home / "ensembles" / "demo" / ".abc.json.q1w2e3r4.tmp"
    for folder in (index_tmp, index_old / "old", spill):
        folder.mkdir(parents=True)
        (folder / "records.parquet").write_bytes(b"leftover")
    for path in (atomic, legacy):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"leftover")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    # a live writer's files (this process): kept
    mine = shard_dir / f".v000099.parquet.tmp-{os.getpid()}"
    mine.write_bytes(b"in flight")
    in_flight = store.write_version("demo", 0, store.read("demo", 0))
    young_legacy = settings.home / "ensembles" / "demo" / ".def.json.z9x8c7v6.tmp"
    young_legacy.write_bytes(b"too young to judge")
    unknown = settings.home / "notes.txt"
    unknown.write_text("an operator's file")

    engine = open_database(settings)
    try:
        report = sweep(settings, engine).to_dict()
    finally:
        engine.dispose()

    assert report["ok"], report["errors"]
    # writer markers: of the two ingested (recorded) versions and of the killed writer's version
    assert report["removed"] == {"atomic_temp": 2, "index_temp": 2, "ingest_spill": 1, "orphan_locate_index": 1,
                                 "shard_temp": 1, "unrecorded_shard_version": 1, "writer_marker": 3}, report
    assert report["kept_in_flight"] == {"atomic_temp": 1, "shard_temp": 1, "unrecorded_shard_version": 1,
                                        "writer_marker": 1}
    assert report["unknown"] == 1
    for gone in (index_tmp, index_old, spill, atomic, legacy, store.path_of("demo", 1, 2),
                 Path(f"{store.path_of('demo', 1, 2)}.dedup")):
        assert not gone.exists(), gone
    assert not list(shard_dir.glob(".v000002.parquet.tmp-*"))
    for kept in (*live_before, mine, in_flight.path, young_legacy, unknown):
        assert kept.exists(), kept
    assert _events(settings, "gc.swept")[-1]["removed"] == report["removed"]  # counts only, in the audit log


def test_a_non_matching_leftover_version_is_removed_not_kept_forever(settings: Settings) -> None:
    """Before the fix, _write_or_adopt skipped the leftover (which holds every record,
    the erased ones included) and wrote the next version beside it."""
    from pipeline.erasure import _write_or_adopt

    _ingest(settings)
    store = ShardStore(settings.shards_dir)
    _killed_writer(settings, """
        store.write_version("demo", 0, store.read("demo", 0))
        die()
    """)
    leftover = store.path_of("demo", 0, 2)
    assert leftover.exists()
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            dataset = session.scalars(select(Dataset)).one()
            base = latest_shard_versions(session, dataset.id)[0]
    finally:
        engine.dispose()
    erased = pq.read_table(base.path, columns=["record_id"])["record_id"].to_pylist()[:3]
    ref = _write_or_adopt(store, "demo", 0, base, erased)
    assert ref.version == 2 and ref.path == leftover
    assert not set(erased) & set(pq.read_table(ref.path, columns=["record_id"])["record_id"].to_pylist())
    assert not store.path_of("demo", 0, 3).exists()


def test_a_leftover_of_a_live_writer_is_left_to_it(settings: Settings) -> None:
    from pipeline.erasure import _write_or_adopt

    _ingest(settings)
    store = ShardStore(settings.shards_dir)
    in_flight = store.write_version("demo", 0, store.read("demo", 0))  # this process: alive, may still record it
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            base = latest_shard_versions(session, session.scalars(select(Dataset)).one().id)[0]
    finally:
        engine.dispose()
    erased = pq.read_table(base.path, columns=["record_id"])["record_id"].to_pylist()[:1]
    ref = _write_or_adopt(store, "demo", 0, base, erased)
    assert ref.version == 3 and in_flight.path.exists()


def test_a_failed_sibling_request_does_not_block_the_purge(settings: Settings) -> None:
    """Before the fix any open state (failed included) of another request that erased
    from the shard deferred the purge, and nothing purged it later."""
    from pipeline.erasure import purge_superseded_files
    from pipeline.gc import sweep

    demo = _ingest(settings)
    subject = demo["subject"]
    first = _submit(settings, [("email", subject["email"])], [], "first")
    _process(settings, first)
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            purged = [v for v in session.scalars(select(ShardVersion)) if v.files_purged_at is not None]
            assert purged, "the completed request purged its superseded versions"
            # a sibling that erased from the same shard and failed; then the first request's files come back
            # unpurged (as they were while the sibling was still verifying)
            match = session.scalars(select(RequestMatch).where(RequestMatch.request_id == first,
                                                              RequestMatch.erased_in_shard_version.is_not(None))).first()
            sibling = _submit(settings, [("email", "nobody@example.org")], [], "sibling")
            session.add(RequestMatch(request_id=sibling, dataset_id=match.dataset_id, match_ref="x", shard=match.shard,
                                     shard_version=match.shard_version, slice=match.slice, record_id="other",
                                     method="identifier", metric="identifier", score=1.0, decision="erase", hop=0,
                                     query="identifier", final_decision="erase",
                                     erased_in_shard_version=match.erased_in_shard_version))
            session.execute(text("UPDATE erasure_requests SET state = 'verifying' WHERE id = :id"), {"id": sibling})
            for version in purged:
                version.files_purged_at = None
        with unit_of_work(engine) as session:
            assert purge_superseded_files(settings, session, first).deferred_shards == [match.shard]
            session.rollback()
        with unit_of_work(engine) as session:
            session.execute(text("UPDATE erasure_requests SET state = 'failed' WHERE id = :id"), {"id": sibling})
        with unit_of_work(engine) as session:
            report = purge_superseded_files(settings, session, first)
            assert report.deferred_shards == []
        # and a purge deferred by a sibling is done by the next sweep
        with unit_of_work(engine) as session:
            for version in session.scalars(select(ShardVersion).where(ShardVersion.files_purged_at.is_not(None))):
                version.files_purged_at = None
        swept = sweep(settings, engine)
        assert swept.purged_superseded["shard_versions"] >= 1 and swept.ok
    finally:
        engine.dispose()


def test_the_sqlite_wal_holds_no_sample_after_completion(sqlite_settings: Settings) -> None:
    settings = sqlite_settings
    demo = _ingest(settings)
    sample = "my very private words about the parcel that never came " + "zqxj " * 5
    wal = Path(settings.resolved_database_url.split("///", 1)[1] + "-wal")
    # A long-lived process (the API, a worker) keeps a connection open: SQLite then never
    # deletes the log on the last close, and the sample's page images stay in it.
    server = open_database(settings)
    try:
        with server.connect() as idle:
            idle.execute(text("SELECT 1")).all()
            idle.commit()
            request_id = _submit(settings, [("email", demo["subject"]["email"])], [sample], "wal")
            assert sample.encode() in wal.read_bytes()
            _process(settings, request_id)
            for path in (wal, Path(str(wal)[:-4])):
                assert not path.exists() or sample[:40].encode() not in path.read_bytes(), path
    finally:
        server.dispose()


@pytest.mark.postgres
def test_postgres_sample_table_is_rewritten_after_completion(postgres_url: str, tmp_path: Path) -> None:
    from tests.conftest import TEST_SECRET

    settings = Settings(home=tmp_path / "home", database_url=postgres_url, secret_key=TEST_SECRET)
    demo = _ingest(settings)
    request_id = _submit(settings, [("email", demo["subject"]["email"])], ["a sample to purge " * 3], "pg")
    engine = open_database(settings)
    try:
        with engine.connect() as conn:
            before = conn.execute(text("SELECT pg_relation_filenode('request_samples')")).scalar()
        _process(settings, request_id)
        with engine.connect() as conn:
            after = conn.execute(text("SELECT pg_relation_filenode('request_samples')")).scalar()
    finally:
        engine.dispose()
    assert before != after  # VACUUM (FULL) wrote the table anew: the dead sample rows' pages are gone


# ---------------------------------------------------------------- the residue check


def test_residue_check_is_clean_after_an_erasure_and_finds_what_is_planted(settings: Settings) -> None:
    from pipeline.certificate import stored_certificate
    from pipeline.residue import check_residue, mark_upstream_done

    demo = _ingest(settings)
    request_id = _submit(settings, [("email", demo["subject"]["email"])], [], "residue")
    store = ShardStore(settings.shards_dir)
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            originals = {s: Path(v.path).read_bytes() for s, v in latest_shard_versions(
                session, session.scalars(select(Dataset)).one().id).items()}
        _process(settings, request_id)
        report = check_residue(settings, engine, request_id)
        assert report["clean"], json.dumps(report["summary"])
        assert report["summary"]["orphans"] == 0 and report["shards"]["hit_count"] == 0
        assert report["database"]["hits"] == 0 and report["prefect"]["status"] == "not_checked"
        assert not report["complete"]  # Prefect not checked: never called clean as a whole
        assert sum(report["tombstones"].values()) >= len(demo["subject"]["originals"])
        upstream = report["upstream"]
        assert len(upstream) == 1 and upstream[0]["open"] and upstream[0]["path"] == str(demo["files"].records)
        assert upstream[0]["rows"] and all(isinstance(r, int) for r in upstream[0]["rows"])
        with unit_of_work(engine) as session:
            certificate = stored_certificate(session, request_id).envelope["certificate"]
        assert certificate["residue"]["clean"] and certificate["residue"]["upstream_actions"][0]["open"]

        # planted: an old version restored and recorded (holds the erased records), an unknown file
        shard = next(m["shard"] for m in _matches(engine, request_id) if m["erased"])
        data = originals[shard]
        restored = store.shard_dir("demo", shard) / "v000009.parquet"
        restored.write_bytes(data)
        with unit_of_work(engine) as session:
            add_shard_version(session, dataset_id=session.scalars(select(Dataset)).one().id, shard=shard, version=9,
                              path=str(restored), sha256="0" * 64, row_count=1, created_by="test:restore")
        (store.shard_dir("demo", shard) / "notes.txt").write_text("who knows")
        found = check_residue(settings, engine, request_id)
        assert not found["clean"]
        erased = {m["record_id"] for m in _matches(engine, request_id) if m["erased"] and m["shard"] == shard}
        hits = {h["record_id"] for h in found["shards"]["hits"] if h["version"] == 9}
        assert erased <= hits and found["shards"]["unresolved"] >= len(erased)
        assert [o["kind"] for o in found["inventory"]["orphans"]] == ["unknown_file"]
        assert "text" not in json.dumps(found["shards"]["hits"])  # ids and numbers only

        # upstream: open in `due` until marked done
        from db.audit_queries import due_requests
        from pipeline.lifecycle import OPEN_STATES

        with unit_of_work(engine) as session:
            assert len(due_requests(session, open_states=OPEN_STATES).upstream_open) == 1
            with pytest.raises(LookupError):
                mark_upstream_done(session, request_id, "f" * 64, actor="cli:test")
            done = mark_upstream_done(session, request_id, upstream[0]["sha256"], actor="cli:test")
            assert not any(a["open"] for a in done["actions"])
        with unit_of_work(engine) as session:
            assert due_requests(session, open_states=OPEN_STATES).upstream_open == ()
    finally:
        engine.dispose()
    assert _events(settings, "upstream.done") and _events(settings, "residue.checked")


def _matches(engine, request_id: str) -> list[dict]:  # noqa: ANN001
    with unit_of_work(engine) as session:
        return [{"shard": m.shard, "record_id": m.record_id, "erased": m.erased_in_shard_version is not None}
                for m in session.scalars(select(RequestMatch).where(RequestMatch.request_id == request_id))]


def test_residue_cli_and_gc_cli(sqlite_settings: Settings) -> None:
    settings = sqlite_settings
    demo = _ingest(settings)
    request_id = _submit(settings, [("email", demo["subject"]["email"])], [], "cli")
    _process(settings, request_id)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ERASURE_SECRET_KEY": settings.secret_key.get_secret_value()}
    env.pop("PREFECT_API_URL", None)
    flags = ["--home", str(settings.home), "--database-url", settings.resolved_database_url, "--json"]
    done = subprocess.run([sys.executable, "-m", "api.cli", "audit", "residue", request_id, *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["clean"]
    bad = subprocess.run([sys.executable, "-m", "api.cli", "audit", "residue", "not-a-uuid", *flags],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "UUID" in bad.stderr
    dead = _dead_pid()
    (settings.home / "tmp" / f"ingest-{dead}-deadbeef").mkdir(parents=True)
    swept = subprocess.run([sys.executable, "-m", "api.cli", "gc", *flags], capture_output=True, text=True,
                           env=env, cwd=ROOT)
    assert swept.returncode == 0, swept.stderr[-2000:]
    assert json.loads(swept.stdout)["removed"] == {"ingest_spill": 1}
    shutil.rmtree(settings.home / "tmp")


def test_residue_route_behind_the_audit_scope(settings: Settings) -> None:
    import uuid

    from fastapi.testclient import TestClient

    from api.app import create_app
    from db.requests import issue_token

    demo = _ingest(settings, 300)
    request_id = _submit(settings, [("email", demo["subject"]["email"])], [], "api")
    _process(settings, request_id)
    app = create_app(settings)
    with unit_of_work(app.state.engine) as session:
        audit, _ = issue_token(session, "auditor", ["audit"])
        intake, _ = issue_token(session, "intake-bot", ["intake"])
    client = TestClient(app)
    path = f"/v1/audit/requests/{request_id}/residue"
    answer = client.get(path, headers={"Authorization": f"Bearer {audit}"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["clean"] and body["summary"]["shard_hits"] == 0 and body["prefect"]["status"] == "not_checked"
    assert client.get(path, headers={"Authorization": f"Bearer {intake}"}).status_code == 403
    assert client.get(f"/v1/audit/requests/{uuid.uuid4()}/residue",
                      headers={"Authorization": f"Bearer {audit}"}).status_code == 404

"""Storage by URL end to end (issue 13, part 1): with ``ERASURE_STORAGE_URL=s3://bucket/prefix``
on a real S3-compatible server (moto's), data ingested and trained on one host ("api", its
own home) is erased and retrained by a request processed on another ("worker") whose home
starts empty and shares only the database, the storage URL and the secret key (given by
environment, never written to the store)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.audit import Certificate
from db.models import ShardVersion
from db.session import unit_of_work
from db.settings import Settings, use_settings
from db.training import Checkpoint, EnsembleVersionRow
from pipeline.certificate import verify_certificate
from pipeline.database import open_database
from pipeline.gc import sweep
from pipeline.ingest import IngestOptions, ShardChangedDuringIngest, ingest_source_file
from pipeline.object_store import ObjectMismatch, is_object_url, object_store, shard_file
from pipeline.signing import load_or_create_signing_key
from pipeline.training import list_shards, publish_trained_members, train_one_shard
from shards.demo_data import write_demo
from shards.files import sha256_file
from shards.sources import FieldMap
from tests.prefect_server import demo_subject, submit_for
from tests.s3_server import S3Server, running_s3_server

FIELDS = FieldMap(id_field="id", text_field="text", label_field="label",
                  identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")))
OPTIONS = {"epochs": 1.0, "hidden": [16], "batch_size": 64}
SECRET = "shared-secret-key-0123456789abcdef"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


def _hosts(tmp_path: Path, database_url: str, s3: S3Server) -> tuple[Settings, Settings, str]:
    bucket = s3.new_bucket()
    shared = dict(database_url=database_url, storage_url=f"s3://{bucket}/erasure", s3_endpoint_url=s3.endpoint_url,
                  secret_key=SECRET, signing_key_file=tmp_path / "vault" / "signing_key.pem",
                  storage_orphan_grace_s=0)
    return Settings(home=tmp_path / "api", **shared), Settings(home=tmp_path / "worker", **shared), bucket


def _ingest_and_train(api: Settings, files) -> None:  # noqa: ANN001
    ingest_source_file(files.records, IngestOptions(dataset="demo", fields=FIELDS, n_shards=3, n_slices=3), api)
    members = [train_one_shard(api, "demo", shard, OPTIONS) for shard in list_shards(api, "demo")]
    publish_trained_members(api, "demo", members)


def _all_bytes(s3: S3Server, bucket: str) -> dict[str, bytes]:
    import boto3

    from tests.s3_server import _boto_credentials

    client = boto3.client("s3", endpoint_url=s3.endpoint_url, **_boto_credentials())
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in s3.keys(bucket)}


def test_a_request_is_processed_on_a_worker_whose_home_starts_empty(
        tmp_path: Path, database_url: str, s3: S3Server, prefect_env: dict) -> None:
    from flows.process_request import process_erasure_request

    api, worker, bucket = _hosts(tmp_path, database_url, s3)
    files = write_demo(tmp_path / "sources", 300, seed=0)
    _ingest_and_train(api, files)
    engine = open_database(api)
    with unit_of_work(engine) as session:
        rows = list(session.scalars(select(ShardVersion)))
        assert rows and all(is_object_url(r.path) for r in rows)  # rows name objects, not api's home
        assert all(is_object_url(c.path) for c in session.scalars(select(Checkpoint)))
        assert all(is_object_url(e.manifest_path) for e in session.scalars(select(EnsembleVersionRow)))
        before = {r.path for r in rows}
    subject = demo_subject(files.ground_truth)
    request_id = submit_for(api, subject)

    assert not worker.home.exists()
    with use_settings(worker):
        summary = process_erasure_request(request_id, review_timeout_s=0, on_review_timeout="erase")
    assert summary["state"] == "completed", summary
    assert summary["datasets"][0]["erased"] >= len(subject["originals"])
    assert (worker.home / "shards").is_dir()  # the worker materialised what it needed in its own home

    with unit_of_work(engine) as session:
        envelope = json.loads(session.get(Certificate, request_id).document)
        purged_rows = list(session.scalars(select(ShardVersion).where(ShardVersion.files_purged_at.is_not(None))))
        purged_versions = [r.path for r in purged_rows]
        purged_sha256 = {r.sha256 for r in purged_rows}
        purged_checkpoints = [c.path for c in session.scalars(
            select(Checkpoint).where(Checkpoint.file_purged_at.is_not(None)))]
        live = [r.path for r in session.scalars(select(ShardVersion).where(ShardVersion.files_purged_at.is_(None)))]
    assert verify_certificate(envelope, load_or_create_signing_key(api).public_key_pem).valid
    section = envelope["certificate"]["datasets"][0]
    assert section["verification"]["training_manifest"]["passed"] is True
    assert all(j["exactness"]["status"] == "exact" for j in section["retraining"])

    # The erased shards' old versions and the checkpoints that saw the records are gone from the bucket.
    keys = set(s3.keys(bucket))
    assert purged_versions and set(purged_versions) <= before
    for url in purged_versions + purged_checkpoints:
        assert url.split(f"s3://{bucket}/", 1)[1] not in keys, url
    assert all(url.split(f"s3://{bucket}/", 1)[1] in keys for url in live)
    # ... and no copy of them is left in the worker's home, which purged them
    assert not [p for p in worker.home.rglob("*.parquet") if sha256_file(p) in purged_sha256]

    # Only content-addressed objects; no secret among them.
    contents = _all_bytes(s3, bucket)
    assert all(key.startswith("erasure/objects/") for key in contents)
    signing_pem = worker.signing_key_path.read_bytes()
    assert not [k for k, data in contents.items() if SECRET.encode() in data or signing_pem in data]
    assert not (tmp_path / "worker" / "secret.key").exists() and not (tmp_path / "api" / "secret.key").exists()

    # The probe's plot is an object too: the api host's console shows what the worker drew.
    from pipeline.membership import report_file

    with unit_of_work(engine) as session:
        plot = report_file(api, session, request_id, "demo")
    assert plot is not None and api.home in plot.parents and plot.read_bytes().startswith(b"\x89PNG")

    # The residue check, which looks in the store too, finds nothing left over.
    from pipeline.residue import check_residue

    report = check_residue(worker, engine, request_id)
    assert report["summary"]["orphans"] == 0, report["inventory"]["orphans"]
    assert report["summary"]["shard_hits_unresolved"] == 0


def test_a_reader_refuses_a_shard_version_whose_object_was_altered(
        tmp_path: Path, sqlite_url: str, s3: S3Server) -> None:
    api, worker, _ = _hosts(tmp_path, sqlite_url, s3)
    files = write_demo(tmp_path / "sources", 120, seed=1)
    ingest_source_file(files.records, IngestOptions(dataset="demo", fields=FIELDS, n_shards=2, n_slices=2), api)
    engine = open_database(api)
    with unit_of_work(engine) as session:
        row = session.scalars(select(ShardVersion).order_by(ShardVersion.shard)).first()
        object_store(api).fs.pipe_file(row.path, b"PAR1 not the rows the database recorded")
        with pytest.raises(ObjectMismatch, match="its database row records"):
            shard_file(worker, row)
    assert not list((worker.home / "shards").rglob("*.parquet"))


def test_an_object_whose_transaction_rolled_back_is_never_live_and_the_sweep_removes_it(
        tmp_path: Path, sqlite_url: str, s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    api, _, bucket = _hosts(tmp_path, sqlite_url, s3)
    files = write_demo(tmp_path / "sources", 120, seed=2)
    import pipeline.ingest as ingest_module

    def fail_after_upload(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ShardChangedDuringIngest("an erasure committed meanwhile (simulated)")

    # The shard versions are uploaded while the lineage transaction is open; it then fails.
    monkeypatch.setattr(ingest_module, "bulk_insert", fail_after_upload)
    with pytest.raises(ShardChangedDuringIngest):
        ingest_source_file(files.records, IngestOptions(dataset="demo", fields=FIELDS, n_shards=2, n_slices=2), api)
    uploaded = s3.keys(bucket)
    assert uploaded  # the objects were written ...
    engine = open_database(api)
    with unit_of_work(engine) as session:
        assert session.scalars(select(ShardVersion)).first() is None  # ... but no row names them
    from pipeline.residue import _inventory

    inventory = _inventory(api, engine)  # the residue check's inventory looks in the store too
    assert inventory["orphan_count"] == len(uploaded)
    assert {o["kind"] for o in inventory["orphans"]} == {"orphan_object"}
    report = sweep(api, engine)
    assert report.ok, report.errors
    assert report.removed.get("orphan_object") == len(uploaded)
    assert s3.keys(bucket) == []

"""Shared storage by URL (``pipeline/object_store.py``) against a real S3-compatible server
(moto's, see ``tests/s3_server.py``): content-addressed uploads, verified downloads, deletes
that are checked, and secrets that never leave the host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from db.settings import Settings
from pipeline.object_store import (
    ObjectMismatch,
    SecretRefused,
    local_copy,
    object_store,
    publish_file,
    sha256_of_url,
)
from shards.files import sha256_file
from tests.s3_server import S3Server, running_s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


def store_settings(s3: S3Server, home: Path) -> Settings:
    return Settings(home=home, storage_url=f"s3://{s3.new_bucket()}/data", s3_endpoint_url=s3.endpoint_url)


def test_storage_url_must_be_s3_or_unset(tmp_path: Path) -> None:
    assert Settings(home=tmp_path, storage_url="").storage_url is None
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        Settings(home=tmp_path, storage_url="/mnt/shared")


def test_without_a_storage_url_rows_record_home_paths(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    file = tmp_path / "v000001.parquet"
    file.write_bytes(b"rows")
    assert object_store(settings) is None
    assert publish_file(settings, file) == str(file)
    assert local_copy(settings, str(file), None, tmp_path / "elsewhere") == file


def test_a_published_file_is_fetched_verified_on_another_host(s3: S3Server, tmp_path: Path) -> None:
    writer = store_settings(s3, tmp_path / "a")
    file = tmp_path / "a" / "v000001.parquet"
    file.parent.mkdir(parents=True)
    file.write_bytes(b"shard rows")
    url = publish_file(writer, file)
    sha = sha256_file(file)
    bucket = writer.storage_url.removeprefix("s3://").split("/")[0]
    assert url == f"{writer.storage_url}/objects/{sha[:2]}/{sha}.parquet"
    assert s3.keys(bucket) == [f"data/objects/{sha[:2]}/{sha}.parquet"]
    assert publish_file(writer, file) == url  # the same bytes: the same object

    reader = Settings(home=tmp_path / "b", storage_url=writer.storage_url, s3_endpoint_url=s3.endpoint_url)
    dest = tmp_path / "b" / "shards" / "v000001.parquet"
    assert local_copy(reader, url, sha, dest) == dest
    assert dest.read_bytes() == b"shard rows"


def test_a_reader_refuses_an_object_whose_bytes_do_not_match_its_row(s3: S3Server, tmp_path: Path) -> None:
    settings = store_settings(s3, tmp_path)
    file = tmp_path / "manifest.json"
    file.write_bytes(b'{"members": []}')
    url = publish_file(settings, file)
    # Someone overwrites the object in the bucket behind the database's back.
    object_store(settings).fs.pipe_file(url, b'{"members": ["tampered"]}')
    dest = tmp_path / "cache" / "manifest.json"
    with pytest.raises(ObjectMismatch, match="refusing to use it"):
        local_copy(settings, url, sha256_of_url(url), dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing half-written
    with pytest.raises(ObjectMismatch, match="does not carry"):
        local_copy(settings, url, "0" * 64, dest)


def test_a_deleted_object_is_checked_gone(s3: S3Server, tmp_path: Path) -> None:
    settings = store_settings(s3, tmp_path)
    file = tmp_path / "ckpt.pt"
    file.write_bytes(b"weights")
    url = publish_file(settings, file)
    store = object_store(settings)
    assert store.exists(url)
    store.delete(url)
    assert not store.exists(url)
    with pytest.raises(FileNotFoundError, match="not in the store"):
        local_copy(settings, url, None, tmp_path / "again.pt")
    with pytest.raises(ValueError, match="not under this store"):
        store.delete("s3://another-bucket/objects/ab/" + "ab" * 32)


def test_hosts_sharing_a_store_must_be_given_the_key(s3: S3Server, tmp_path: Path) -> None:
    settings = store_settings(s3, tmp_path)
    with pytest.raises(ValueError, match="same ERASURE_SECRET_KEY"):
        settings.secret_key_bytes()  # a key generated on one host would match nothing on the others
    assert not (tmp_path / "secret.key").exists()


def test_secrets_never_go_to_the_store(s3: S3Server, tmp_path: Path) -> None:
    settings = store_settings(s3, tmp_path)
    Settings(home=tmp_path).secret_key_bytes()  # a key file generated into the home (one machine)
    from pipeline.signing import load_or_create_signing_key

    load_or_create_signing_key(settings)
    for secret in (tmp_path / "secret.key", settings.signing_key_path):
        with pytest.raises(SecretRefused, match="never goes to the shared store"):
            publish_file(settings, secret)
    assert object_store(settings).objects() == []

"""Shared storage by URL: where shard versions and their locate indexes, checkpoints,
ensemble manifests, tombstones and the probe's plots live when workers run on several
hosts (``ERASURE_STORAGE_URL``).

Unset (the default), nothing here does anything: rows record paths under the home,
exactly as on one machine. Set to ``s3://bucket/prefix`` (any S3-compatible store,
through fsspec/s3fs), every shared file is uploaded under a content-addressed name,
``<prefix>/objects/<sha256[:2]>/<sha256><suffix>``, and the row that names it records
that URL (and its sha256). Publishing needs no rename: an object becomes part of the
data only when the transaction of the row naming it commits; one uploaded by a
transaction that rolled back is named by nothing, and the sweep removes it once it is
older than ``ERASURE_STORAGE_ORPHAN_GRACE_S`` (a writer uploads before it commits).

The pure core keeps taking local paths: a host materialises what a row names into its
home (its scratch cache), at the same place the file would have on one machine, and
verifies the bytes against the sha256 the row records (the URL names it too). A
mismatch raises ``ObjectMismatch`` and nothing is left at the destination. A version's
locate indexes travel as one tar object (``shard_versions.index_url``), unpacked beside
its copy. Copies of purged rows are removed by each host's sweep (``pipeline.gc``).

Secrets never go to the store: ``publish_file`` refuses the dataset key file and the
signing key.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from db.settings import Settings
from shards.files import file_stamp, fsync_dir, sha256_file

OBJECTS = "objects"
_OBJECT_NAME = re.compile(r"^([0-9a-f]{64})(\.[A-Za-z0-9.]+)?$")
_SECRET_NAMES = ("secret.key",)


class ObjectMismatch(RuntimeError):
    """An object's bytes do not hash to the sha256 its row records."""


class SecretRefused(ValueError):
    """A secret (the dataset key, the signing key) was about to be uploaded to the shared store."""


def is_object_url(recorded: str | os.PathLike) -> bool:
    """Whether a row's path names an object in a store (rather than a file in the home)."""
    return str(recorded).startswith("s3://")


def sha256_of_url(url: str) -> str:
    """The sha256 a content-addressed object's name carries."""
    found = _OBJECT_NAME.match(url.rsplit("/", 1)[-1])
    if found is None:
        raise ValueError(f"{url} is not a content-addressed object name (<sha256><suffix>)")
    return found.group(1)


@dataclass(frozen=True)
class StoredObject:
    url: str
    size: int
    modified: datetime


class ObjectStore:
    """Content-addressed objects under one ``s3://bucket/prefix``."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        import s3fs  # only a host configured for shared storage needs it

        self.url = url.rstrip("/")
        client_kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
        # No listing cache: another host's delete must be seen by the next existence check.
        self.fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False,
                                    skip_instance_cache=True)

    def url_for(self, sha256: str, suffix: str = "") -> str:
        return f"{self.url}/{OBJECTS}/{sha256[:2]}/{sha256}{suffix}"

    def owns(self, url: str) -> bool:
        return url.startswith(self.url + "/")

    def put_file(self, path: Path | str, suffix: str = "", sha256: str | None = None) -> tuple[str, str]:
        """Upload ``path`` under its content address; (url, sha256). One PUT: the object appears
        whole or not at all. Sent even when the same bytes are there: the upload renews the
        object's time, so the sweep does not take it for an old orphan before our row commits."""
        sha256 = sha256 or sha256_file(path)
        url = self.url_for(sha256, suffix)
        self.fs.put_file(str(path), url)
        return url, sha256

    def fetch(self, url: str, sha256: str, dest: Path | str) -> Path:
        """Download ``url`` to ``dest`` if its bytes hash to ``sha256``; otherwise raise
        ``ObjectMismatch`` and leave nothing at ``dest``."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}.{threading.get_ident()}")
        try:
            try:
                self.fs.get_file(url, str(tmp))
            except FileNotFoundError:
                raise FileNotFoundError(f"object {url} is not in the store (purged, or never uploaded)") from None
            actual = sha256_file(tmp)
            if actual != sha256:
                raise ObjectMismatch(
                    f"object {url} has sha256 {actual}, its database row records {sha256}: the object was "
                    "changed or corrupted in the store; refusing to use it")
            os.replace(tmp, dest)  # local scratch: the rename only hides a partial download
            fsync_dir(dest.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def age_seconds(self, url: str) -> float:
        """Seconds since the object was last written (0 if it is gone)."""
        try:
            modified = self.fs.info(url)["LastModified"]
        except FileNotFoundError:
            return 0.0
        return (datetime.now(timezone.utc) - modified).total_seconds()

    def exists(self, url: str) -> bool:
        return bool(self.fs.exists(url))

    def delete(self, url: str) -> None:
        """Delete an object and check it is gone (a missing one counts as deleted)."""
        if not self.owns(url):
            raise ValueError(f"{url} is not under this store ({self.url}); refusing to delete it")
        try:
            self.fs.rm_file(url)
        except FileNotFoundError:
            pass
        if self.fs.exists(url):
            raise OSError(f"object {url} is still in the store after its deletion")

    def objects(self) -> list[StoredObject]:
        """Every object under the prefix's ``objects/`` (the store's whole content)."""
        root = f"{self.url}/{OBJECTS}"
        if not self.fs.exists(root):
            return []
        found = []
        for key, info in self.fs.find(root, detail=True).items():
            modified = info.get("LastModified") or datetime.now(timezone.utc)
            found.append(StoredObject(f"s3://{key}", int(info.get("size", 0)), modified))
        return sorted(found, key=lambda o: o.url)


_stores: dict[tuple[str, str | None, int], ObjectStore] = {}
_stores_lock = threading.Lock()


def object_store(settings: Settings) -> ObjectStore | None:
    """The configured store (one per process and URL), or None: everything stays in the home."""
    if settings.storage_url is None:
        return None
    # per process: a forked worker opens its own connections, as pipeline.database does
    key = (settings.storage_url, settings.s3_endpoint_url, os.getpid())
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = ObjectStore(settings.storage_url, settings.s3_endpoint_url)
        return store


def _refuse_secret(settings: Settings, path: Path) -> None:
    resolved = path.resolve()
    if path.name in _SECRET_NAMES or resolved == settings.signing_key_path or resolved == settings.home / "secret.key":
        raise SecretRefused(f"{path} is a secret key; it never goes to the shared store")


def publish_file(settings: Settings, path: Path | str, sha256: str | None = None) -> str:
    """What a row records for a file just written in the home: its path (no store) or the
    URL of its uploaded object. Called before the row's transaction commits."""
    store = object_store(settings)
    if store is None:
        return str(path)
    path = Path(path)
    _refuse_secret(settings, path)
    return store.put_file(path, "".join(path.suffixes[-1:]), sha256)[0]


# dest -> (sha256, file stamp) of files verified by this process: a cached file is hashed once.
_verified: dict[str, tuple[str, tuple[int, int, int, int]]] = {}


def local_copy(settings: Settings, recorded: str, sha256: str | None, dest: Path | str) -> Path:
    """The local file of what a row records: the path itself (no store), or the object
    materialised at ``dest`` in this host's home, verified against ``sha256`` (by default the
    one the object's name carries)."""
    if not is_object_url(recorded):
        return Path(recorded)
    store = object_store(settings)
    if store is None:
        raise RuntimeError(f"a database row names {recorded} but ERASURE_STORAGE_URL is not set on this host; "
                           "give every host the same ERASURE_STORAGE_URL")
    sha256 = sha256 or sha256_of_url(recorded)
    if sha256_of_url(recorded) != sha256:
        raise ObjectMismatch(f"object {recorded} does not carry the sha256 its row records ({sha256})")
    dest = Path(dest)
    stamp = file_stamp(dest)
    if stamp is not None:
        if _verified.get(str(dest)) == (sha256, stamp):
            return dest
        if sha256_file(dest) == sha256:
            _verified[str(dest)] = (sha256, stamp)
            return dest
        dest.unlink()  # a stale or damaged cached copy: fetched again below
    store.fetch(recorded, sha256, dest)
    _verified[str(dest)] = (sha256, file_stamp(dest))
    return dest


def delete_object(settings: Settings, recorded: str) -> None:
    """Delete what a row names when it is an object (a local path is the caller's to unlink)."""
    if not is_object_url(recorded):
        return
    store = object_store(settings)
    if store is None:
        raise RuntimeError(f"cannot delete {recorded}: ERASURE_STORAGE_URL is not set on this host")
    store.delete(recorded)


# ------------------------------------------------------------ what rows name, on this host


def shard_version_home_path(settings: Settings, dataset: str, shard: int, version: int) -> Path:
    """Where a shard version's file lies in a home (on one machine, the file the row names)."""
    from shards.store import ShardStore

    return ShardStore(settings.shards_dir).path_of(dataset, shard, version)


def _dataset_name(row: object, dataset: str | None) -> str:
    if dataset is not None:
        return dataset
    from sqlalchemy.orm import object_session

    from db.models import Dataset

    session = object_session(row)
    if session is None:
        raise RuntimeError("a detached lineage row: pass the dataset's name")
    return session.get(Dataset, row.dataset_id).name  # type: ignore[attr-defined]


def shard_file(settings: Settings, row: object, dataset: str | None = None, *, with_index: bool = False) -> Path:
    """The local file of a ``ShardVersion`` row: its path on one machine; with a storage URL,
    the object fetched (verified) into this host's home at the usual place (``with_index``: and
    its locate indexes beside it, when its row names them)."""
    path: str = row.path  # type: ignore[attr-defined]
    if not is_object_url(path):
        return Path(path)
    dest = shard_version_home_path(settings, _dataset_name(row, dataset), row.shard, row.version)  # type: ignore
    local = local_copy(settings, path, row.sha256, dest)  # type: ignore[attr-defined]
    if with_index:
        fetch_index(settings, row.index_url, local)  # type: ignore[attr-defined]
    return local


def home_path_of(settings: Settings, recorded: str, home_path: Path) -> Path:
    """The file a row stands for on this host: the recorded path on one machine, else ``home_path``
    (its cached copy, which the sweep and the purge must see too)."""
    return home_path if is_object_url(recorded) else Path(recorded)


def still_stored(settings: Settings, recorded: str, home_path: Path) -> bool:
    """Whether what a row names still exists: the file (one machine), or the object in the store or
    this host's copy of it (a storage URL)."""
    if not is_object_url(recorded):
        return Path(recorded).exists()
    store = object_store(settings)
    return home_path.exists() or (store is not None and store.exists(recorded))


# ------------------------------------------------------------ locate indexes: one tar object each


def publish_index(settings: Settings, shard_version_path: Path | str) -> str | None:
    """With a storage URL: the locate indexes beside a shard version file (``<file>.dedup/``),
    uploaded as one tar object; its URL for the version's row. None without a store."""
    import tarfile

    from dedup.shard_index import artefact_dir

    store = object_store(settings)
    if store is None:
        return None
    folder = artefact_dir(shard_version_path)
    tmp = folder.with_name(f".{folder.name}.tar.tmp-{os.getpid()}.{threading.get_ident()}")
    try:
        with tarfile.open(tmp, "w") as archive:
            for file in sorted(folder.iterdir()):
                archive.add(file, arcname=file.name, recursive=False)
        return store.put_file(tmp, ".tar")[0]
    finally:
        tmp.unlink(missing_ok=True)


def fetch_index(settings: Settings, index_url: str | None, shard_version_path: Path | str) -> None:
    """Put a shard version's locate indexes beside this host's copy when they are missing: the tar
    object its row names, verified, unpacked into a temporary folder and renamed into place."""
    import shutil
    import tarfile

    from dedup.shard_index import artefact_dir

    folder = artefact_dir(shard_version_path)
    if index_url is None or folder.is_dir():
        return
    tag = f"tmp-{os.getpid()}.{threading.get_ident()}"
    archive_path = local_copy(settings, index_url, None, folder.with_name(f".{folder.name}.tar.{tag}"))
    unpacked = folder.with_name(f".{folder.name}.{tag}")
    try:
        with tarfile.open(archive_path) as archive:
            names = archive.getnames()
            if any("/" in n or n.startswith(".") for n in names):
                raise ObjectMismatch(f"index object {index_url} holds unexpected names; refusing to unpack it")
            archive.extractall(unpacked, filter="data")
        try:
            os.rename(unpacked, folder)
        except OSError:
            if not folder.is_dir():  # not another process's identical copy: a real failure
                raise
    finally:
        archive_path.unlink(missing_ok=True)
        _verified.pop(str(archive_path), None)
        if unpacked.exists():  # a failed unpack's partial folder; failing to remove it is an error too
            shutil.rmtree(unpacked)

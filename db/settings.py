"""The one settings object: environment variables, overridable by CLI flags.

``ERASURE_HOME`` holds shards, indexes and checkpoints (default ``./.erasure``).
``ERASURE_DATABASE_URL`` defaults to a SQLite file under the home (the embedded
default); production uses ``postgresql+psycopg://...``. ``ERASURE_SECRET_KEY``
keys the HMAC of identifiers; without it a random key is generated once into
``$ERASURE_HOME/secret.key`` (mode 0600) — losing that file makes stored
identifier hashes unmatchable, so production sets the variable from a vault.
``ERASURE_SIGNING_KEY_FILE`` names the Ed25519 key that signs erasure
certificates (default ``$ERASURE_HOME/signing_key.pem``, generated once, 0600;
see ``pipeline/signing.py``).
``ERASURE_PROCESS_DEPLOYMENT`` names the Prefect deployment the API starts for
each new request (default ``process-erasure-request/on-demand``; empty: none);
``ERASURE_SWEEP_STUCK_AFTER_S`` / ``ERASURE_SWEEP_RECEIVED_GRACE_S`` bound when
the scheduled sweep (``flows/sweep.py``) restarts a waiting request.
``ERASURE_SAMPLE_ONLY_MATCHES`` says how a match reached only from a requester's
sample is decided: ``review`` (default: whatever its score) or ``score``
(``dedup/policy.py``).
``ERASURE_STORAGE_URL`` names where what workers share lives (shard versions,
checkpoints, ensemble manifests, tombstones, reports): unset, the home itself
(one machine, as always); ``s3://bucket/prefix`` for any S3-compatible store
(``pipeline/object_store.py``), with ``ERASURE_S3_ENDPOINT_URL`` for a store
other than AWS (MinIO, moto) and the standard ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` for credentials. The home is
then each host's scratch cache. Secrets (``secret.key``, the signing key) never
go to the store.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERASURE_", extra="ignore")

    home: Path = Field(default=Path(".erasure"))
    database_url: str | None = None
    secret_key: SecretStr | None = None
    signing_key_file: Path | None = None
    sample_only_matches: Literal["review", "score"] = "review"
    # Retrain a sub-model where its recorded runtime (device kind, torch version, CPU threads,
    # deterministic mode) is not available: the result never saw the erased records but is not
    # bitwise comparable, and the certificate says so. Default: refuse (the job stays pending).
    allow_cross_runtime_retrain: bool = False
    # The Prefect deployment the API starts for each new request (and the sweep for a request
    # left waiting); empty: none is started (requests wait for the sweep or an operator).
    process_deployment: str = "process-erasure-request/on-demand"
    # The sweep restarts a request that has stayed in one open state (not received, not
    # failed) this long without a live flow run; and a received one after the grace period
    # that lets the API's own start arrive first.
    sweep_stuck_after_s: int = Field(default=3600, ge=0)
    sweep_received_grace_s: int = Field(default=60, ge=0)
    # Shared storage (see the module docstring): None keeps everything in the home.
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    # An object no row names is removed by the sweep only once older than this: a writer
    # uploads before its transaction commits, and must not lose the object in between.
    storage_orphan_grace_s: int = Field(default=3600, ge=0)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Lineage rows store paths: make them independent of the working directory.
        return Path(home).expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        if url is None or url == "":
            return None
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:///path "
                "or postgresql+psycopg://user@host/db"
            )
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            # SQLAlchemy's bare scheme means psycopg2, which we do not install.
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, url: str | None) -> str | None:
        if url is None or url.strip() == "":
            return None
        url = url.strip().rstrip("/")
        if not url.startswith("s3://") or len(url) <= len("s3://"):
            raise ValueError(
                f"unsupported storage URL {url!r}: leave ERASURE_STORAGE_URL unset for the local home, "
                "or use s3://bucket/prefix")
        return url

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'erasure.db').resolve()}"

    @property
    def signing_key_path(self) -> Path:
        """The certificate signing key (PKCS#8 PEM): the configured file or one in the home."""
        if self.signing_key_file is not None:
            return Path(self.signing_key_file).expanduser().resolve()
        return self.home / "signing_key.pem"

    @property
    def shards_dir(self) -> Path:
        return self.home / "shards"

    def secret_key_bytes(self) -> bytes:
        """The HMAC key; generated into the home on first use when not configured."""
        if self.secret_key is not None:
            key = self.secret_key.get_secret_value().encode()
            if len(key) < 16:
                raise ValueError("ERASURE_SECRET_KEY must be at least 16 characters; use 32 random hex bytes")
            return key
        path = self.home / "secret.key"
        if not path.exists():
            if self.storage_url is not None:
                # Hosts sharing a store must share the key: one generated here would match nothing.
                raise ValueError("ERASURE_STORAGE_URL is set but ERASURE_SECRET_KEY is not: give every host the "
                                 "same ERASURE_SECRET_KEY (32 random hex bytes, from a vault)")
            write_private_file_once(path, secrets.token_hex(32).encode())
        return path.read_text().strip().encode()


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None overrides (CLI flags) applied."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def write_private_file_once(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) holding ``data``, durably; if another process
    created it first, keep theirs (a hard link never replaces a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


class use_settings:
    """Point flows run in this process at ``settings`` (they read the environment,
    as a worker's flows do); the previous values come back afterwards."""

    NAMES = ("ERASURE_HOME", "ERASURE_DATABASE_URL", "ERASURE_SECRET_KEY", "ERASURE_SIGNING_KEY_FILE",
             "ERASURE_ALLOW_CROSS_RUNTIME_RETRAIN", "ERASURE_SAMPLE_ONLY_MATCHES", "ERASURE_STORAGE_URL",
             "ERASURE_S3_ENDPOINT_URL")

    def __init__(self, settings: Settings) -> None:
        self.values = {
            "ERASURE_HOME": str(settings.home),
            "ERASURE_DATABASE_URL": settings.resolved_database_url,
            "ERASURE_SECRET_KEY": settings.secret_key.get_secret_value() if settings.secret_key else None,
            "ERASURE_SIGNING_KEY_FILE": str(settings.signing_key_file) if settings.signing_key_file else None,
            "ERASURE_ALLOW_CROSS_RUNTIME_RETRAIN": "1" if settings.allow_cross_runtime_retrain else None,
            "ERASURE_SAMPLE_ONLY_MATCHES": settings.sample_only_matches,
            "ERASURE_STORAGE_URL": settings.storage_url,
            "ERASURE_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        }
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> use_settings:
        for name, value in self.values.items():
            self.saved[name] = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

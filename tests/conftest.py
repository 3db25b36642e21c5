"""Shared fixtures: real SQLite files and real PostgreSQL databases.

PostgreSQL comes from ERASURE_TEST_POSTGRES_URL (an admin URL; the test command
sets it, default the local server). Each test that asks for a Postgres backend
gets a freshly created database, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from db.settings import Settings

pytest_plugins = ["tests.prefect_server"]

# Timing-based checks make property tests flaky on a busy 2-core CI machine:
# correctness is what they assert; speed is measured by benchmarks/.
hypothesis_settings.register_profile(
    "erasure", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
hypothesis_settings.load_profile("erasure")

ADMIN_URL = os.environ.get("ERASURE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_SECRET = "test-secret-key-not-for-production-0123456789"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL)."""
    name = f"erasure_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(_libpq(ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for this test ({ADMIN_URL}): {exc}; run `bash infra/run.sh test`")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = _libpq(ADMIN_URL).rsplit("/", 1)[0]
    yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    with psycopg.connect(_libpq(ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lineage.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on both backends."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, secret_key=TEST_SECRET)


@pytest.fixture
def sqlite_settings(tmp_path: Path, sqlite_url: str) -> Settings:
    return Settings(home=tmp_path / "home", database_url=sqlite_url, secret_key=TEST_SECRET)


def database_dump(url: str) -> str:
    """Every row of every table as text (pg_dump on PostgreSQL, iterdump on SQLite)."""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.split("///", 1)[1])
        try:
            return "\n".join(conn.iterdump())
        finally:
            conn.close()
    chunks: list[str] = []
    with psycopg.connect(_libpq(url)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )]
        for table in tables:
            with conn.cursor().copy(f'COPY "{table}" TO STDOUT') as copy:
                chunks.append(f"-- {table}\n" + b"".join(bytes(b) for b in copy).decode())
    return "\n".join(chunks)

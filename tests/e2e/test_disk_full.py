"""The data home fills up while a shard version is being written (a small
tmpfs mounted as the data home; needs root): ``erasure ingest`` fails with a
clear message and exit code 1, the previous versions are intact, no temporary
or unpublished file and no lineage row is left, and the same command completes
once space is freed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import database_dump
from tests.e2e.test_cli import run_cli

IDENTIFIERS = ["--identifier-field", "email", "--identifier-field", "user_id", "--identifier-field", "name"]


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(home)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=True)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_full_disk_while_writing_a_shard_version_fails_cleanly_and_a_rerun_completes(
        tmp_path: Path, small_home: Path) -> None:
    database = f"sqlite:///{tmp_path / 'lineage.sqlite'}"  # the database is not on the small device
    made = run_cli(["demo-data", str(tmp_path / "demo"), "--records", "1200", "--json"], small_home, database)
    assert made.returncode == 0, made.stderr
    lines = Path(json.loads(made.stdout)["records"]).read_text().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(lines[:900]))
    second.write_text("".join(lines[900:]))
    ingest = ["--dataset", "demo", *IDENTIFIERS, "--shards", "2", "--slices", "2", "--json"]
    done = run_cli(["ingest", str(first), *ingest], small_home, database)
    assert done.returncode == 0, done.stderr
    before = _files(small_home)
    shard_bytes = sum(p.stat().st_size for p in small_home.rglob("*.parquet"))

    # Leave less free space than the next versions need (each rewrites its whole shard, now a third
    # larger), but enough for the ingest's earlier files: the shard version is what does not fit.
    free = os.statvfs(small_home).f_bavail * os.statvfs(small_home).f_frsize
    filler = small_home / "filler"
    filler.write_bytes(b"\0" * max(0, free - shard_bytes * 9 // 10))
    before[filler.name] = hashlib.sha256(filler.read_bytes()).hexdigest()
    rows = database_dump(database)

    failed = run_cli(["ingest", str(second), *ingest], small_home, database)
    assert failed.returncode == 1, (failed.returncode, failed.stderr[-2000:])
    assert "no space left" in failed.stderr.lower() and "run the same command again" in failed.stderr
    assert "while writing version" in failed.stderr  # it was the shard version that did not fit
    assert "Traceback" not in failed.stderr
    assert _files(small_home) == before  # earlier versions byte for byte; nothing new, nothing half-written
    assert database_dump(database) == rows  # no shard version, record or audit event of the failed ingest

    filler.unlink()
    rerun = run_cli(["ingest", str(second), *ingest], small_home, database)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["new_records"] == len(lines) - 900

"""A throwaway PostgreSQL cluster of a test's own, to stop and start at will
(the shared test server must never go down under other tests). ``initdb`` in a
temporary folder, run as the ``postgres`` user (initdb refuses root), on a free
port of 127.0.0.1, trust authentication; removed afterwards."""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.prefect_server import free_port


class PrivatePostgres:
    def __init__(self, bindir: Path, folder: Path, port: int, host: str = "127.0.0.1") -> None:
        self.bindir, self.folder, self.port, self.host = bindir, folder, port, host
        self.admin_url = f"postgresql://postgres@{host}:{port}/postgres"
        self.url = f"postgresql+psycopg://postgres@{host}:{port}/erasure"

    def _as_postgres(self, *command: str) -> None:
        line = " ".join(command)
        prefix = [] if getpass.getuser() == "postgres" else ["su", "postgres", "-s", "/bin/sh", "-c"]
        subprocess.run([*prefix, line] if prefix else ["/bin/sh", "-c", line], check=True, capture_output=True,
                       timeout=120)

    def start(self) -> None:
        self._as_postgres(f"{self.bindir}/pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"),
                          "-o", f"'-p {self.port} -k {self.folder} -c listen_addresses={self.host} -c fsync=off'",
                          "-w", "start")

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as when the server dies or restarts."""
        self._as_postgres(f"{self.bindir}/pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")


@contextmanager
def private_postgres(host: str = "127.0.0.1", trusted_network: str | None = None) -> Iterator[PrivatePostgres]:
    """A running cluster with an empty ``erasure`` database, listening on ``host``; clients from
    ``trusted_network`` (CIDR, e.g. other test hosts' subnet) are trusted too. Skips when no
    server binaries are installed."""
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
    if getpass.getuser() not in ("root", "postgres"):
        pytest.skip("a private PostgreSQL cluster needs to run as root (su postgres) or as postgres")
    folder = Path(tempfile.mkdtemp(prefix="private-pg-"))
    os.chmod(folder, 0o755)
    shutil.chown(folder, "postgres")
    cluster = PrivatePostgres(Path(bindirs[-1]), folder, free_port(), host)
    try:
        cluster._as_postgres(f"{cluster.bindir}/initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres")
        if trusted_network:
            with open(folder / "data" / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {trusted_network} trust\n")
        cluster.start()
        import psycopg

        with psycopg.connect(cluster.admin_url, autocommit=True) as connection:
            connection.execute("CREATE DATABASE erasure")
        yield cluster
    finally:
        try:
            cluster.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(folder, ignore_errors=True)

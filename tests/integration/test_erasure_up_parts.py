"""The parts of `erasure up` that need no running service: the first admin token, the
refusals before anything starts, the state file other commands read, and the files it
leaves in the data home (which the residue inventory must know)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from api.local_service import LocalService
from api.up_state import running_state, state_path, write_state
from db.requests import find_active_token, revoke_token
from db.session import unit_of_work
from db.settings import Settings
from pipeline.database import open_database
from pipeline.gc import UNKNOWN, classify_home, database_files
from tests.conftest import TEST_SECRET
from tests.prefect_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def _service(settings: Settings) -> LocalService:
    return LocalService(settings, api_port=free_port(), prefect_port=free_port(), say=lambda _: None)


def test_the_first_start_prints_one_admin_token_and_later_starts_none(settings: Settings) -> None:
    settings.home.mkdir(parents=True)
    token = _service(settings)._migrate_and_admin_token()
    assert token is not None and token.startswith("er_")
    assert _service(settings)._migrate_and_admin_token() is None  # a live admin token exists
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            row = find_active_token(session, token)
            assert row is not None and row.scope_set == {"admin"}
            revoke_token(session, row.name)
        again = _service(settings)._migrate_and_admin_token()  # every admin token revoked: a new one
        with unit_of_work(engine) as session:
            assert again is not None and find_active_token(session, again).name == "admin-2"
    finally:
        engine.dispose()
    # printed once, stored only as its hash: the clear token is in no file of the home
    for path in settings.home.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def _up(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ERASURE_"))}
    env.update(ERASURE_HOME=str(home), ERASURE_SECRET_KEY=TEST_SECRET, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "api.cli", "up", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _up(tmp_path / "home", "--api-port", str(port), "--prefect-port", str(free_port()))
    assert done.returncode == 2, done.stderr
    assert f"port {port} is in use" in done.stderr and "--api-port" in done.stderr
    assert not (tmp_path / "home" / "prefect-server").exists() and not state_path(tmp_path / "home").exists()


def test_a_second_erasure_up_for_the_same_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # a live supervisor (this test process) holds the home
    write_state(home, {"pid": os.getpid(), "api_url": "http://127.0.0.1:1", "prefect_ui_url": "http://127.0.0.1:2",
                       "prefect_api_url": "http://127.0.0.1:2/api", "children": {}})
    done = _up(home, "--api-port", str(free_port()), "--prefect-port", str(free_port()))
    assert done.returncode == 2 and "already running" in done.stderr, done.stderr
    assert json.loads(state_path(home).read_text())["pid"] == os.getpid()  # left alone


def test_commands_find_a_running_server_only_if_it_answers(tmp_path: Path, prefect_api_url: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    write_state(home, {"pid": os.getpid(), "prefect_api_url": prefect_api_url, "children": {}})
    assert running_state(home)["prefect_api_url"] == prefect_api_url
    write_state(home, {"pid": os.getpid(), "prefect_api_url": f"http://127.0.0.1:{free_port()}/api", "children": {}})
    assert running_state(home) is None  # nothing answers there: a temporary server, as before
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_state(home, {"pid": int(dead.stdout), "prefect_api_url": prefect_api_url, "children": {}})
    assert running_state(home) is None  # its supervisor is gone: a stale file


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_files_of_erasure_up_are_known_to_the_residue_inventory(settings: Settings) -> None:
    home = settings.home
    (home / "prefect-server").mkdir(parents=True)
    (home / "prefect-server" / "prefect.db").write_bytes(b"x")
    (home / "up-logs").mkdir()
    (home / "up-logs" / "api.log").write_text("started\n")
    write_state(home, {"pid": 1, "prefect_api_url": "http://127.0.0.1:1/api"})
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            entries = classify_home(settings, session)
    finally:
        engine.dispose()
    assert [e.path for e in entries if e.status == UNKNOWN] == []
    kinds = {e.path.relative_to(home).as_posix(): e.kind for e in entries}
    assert kinds["prefect-server"] == "prefect_home" and kinds["up-logs"] == "service_logs"
    assert kinds["up.json"] == "service_state"


def test_the_lock_files_beside_a_database_in_the_home_are_known_to_the_residue_inventory(tmp_path: Path) -> None:
    """The default home holds the SQLite database; migrating it leaves its migration lock file, a
    retraining its shard lock file: empty files that the residue check must not call orphans."""
    home = tmp_path / "home"
    settings = Settings(home=home, database_url=f"sqlite:///{home / 'erasure.db'}", secret_key=TEST_SECRET)
    engine = open_database(settings)
    (home / f"erasure.db.retrain-{(0x5E15 << 48) | (3 << 44):016x}.lock").touch()
    (home / "other.db.migrate.lock").touch()  # not this database's
    try:
        with unit_of_work(engine) as session:
            entries = classify_home(settings, session, database_files=database_files(settings))
    finally:
        engine.dispose()
    kinds = {e.path.name: (e.kind, e.status) for e in entries}
    assert kinds["erasure.db.migrate.lock"] == ("database_lock", "live")
    assert [k for name, k in kinds.items() if name.startswith("erasure.db.retrain-")] == [("database_lock", "live")]
    assert kinds["other.db.migrate.lock"] == ("unknown_file", UNKNOWN)

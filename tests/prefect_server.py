"""A pytest plugin: one real ``prefect server start`` for the whole test session.

Started lazily by the first test that asks for ``prefect_api_url`` (tests that
do not use Prefect never pay for it): a free port, a temporary PREFECT_HOME,
no UI, its own process group; ``/api/health`` is polled until it answers, and
the group is killed at the end of the session. ``prefect_env`` points this
process (via ``temporary_settings``) and the returned environment (for
subprocesses) at it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import flows.prefect_setup  # noqa: F401  (our Prefect defaults before anything imports prefect)

STARTUP_TIMEOUT_S = 120


ROOT = Path(__file__).resolve().parents[1]

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group (a uvicorn supervisor and its workers), SIGKILL after 20 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


def wait_until_answering(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``process`` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


@contextmanager
def api_server(env: dict[str, str], log: Path, workers: int = 1, timeout_s: float = 60) -> Iterator[str]:
    """``erasure serve`` in its own process group, output to ``log``; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "api.cli_requests", "serve", "--port", str(port), "--log-level", "warning"]
    if workers != 1:
        command += ["--workers", str(workers)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_answering(process, f"{base}/openapi.json", log, timeout_s)
            yield base
        finally:
            stop_process_group(process)


def server_environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    return env


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    port = free_port()
    log = open(home / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_environment(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {process.returncode}: "
                                   f"{(home / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def prefect_env(prefect_api_url: str) -> Iterator[dict[str, str]]:
    """This process talks to the session's server; the dict is the environment for subprocesses."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api_url}):
        yield {**os.environ, "PREFECT_API_URL": prefect_api_url}


# ---------------------------------------------------------------- a small trained demo dataset

DEMO_RECORDS = 1000
IDENTIFIER_FIELDS = [["email", "email"], ["user_id", "user_id"], ["name", "name"]]


def demo_subject(ground_truth: Path) -> dict:
    """The demo person with the most planted copies (every locate method has work)."""
    import json

    rows = [json.loads(line) for line in ground_truth.read_text().splitlines()]
    return max((r for r in rows if r["type"] == "person"), key=lambda p: (len(p["copies"]), -p["person"]))


def trained_demo(settings, records: int = DEMO_RECORDS, shards: int = 4, slices: int = 3,  # noqa: ANN001
                 placement: str | None = None) -> dict:
    """Ingest and train the demo data through the flows (settings exported to the environment)."""
    from db.settings import use_settings
    from flows.training import ingest_dataset, train_ensemble
    from shards.demo_data import write_demo

    files = write_demo(settings.home / "demo-data", records, seed=0)
    with use_settings(settings):
        ingested = ingest_dataset(str(files.records), "demo", identifier_fields=IDENTIFIER_FIELDS,
                                  shards=shards, slices=slices, placement=placement)
        trained = train_ensemble("demo", epochs=2, budget="per-shard")  # behaviour, not accuracy: the cheap budget
    return {"files": files, "ingest": ingested, "train": trained, "subject": demo_subject(files.ground_truth)}


def submit_for(settings, subject: dict, key: str = "test-request") -> str:  # noqa: ANN001
    from pipeline.database import open_database
    from pipeline.lifecycle import submit_request

    engine = open_database(settings)
    try:
        return submit_request(engine, settings.secret_key_bytes(), idempotency_key=key,
                              identifiers=[("email", subject["email"])], samples=[], actor="test").request_id
    finally:
        engine.dispose()

"""`erasure up` on a fresh data home runs the whole service by itself.

Real processes only: `erasure up` in a subprocess (its Prefect server, work pools,
deployments, cpu worker and API), `erasure ingest` and `erasure train` as a user
types them (train must use the running server, not a temporary one), then a
request submitted over HTTP with the admin token `erasure up` printed, which
reaches `awaiting_review` or `completed` with no other command. SIGINT (or SIGTERM),
sent while a second request's flow run is live, must then stop every process it
started (none left with this data home in its environment) and free both ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.local_service import descendants, port_is_free
from api.up_state import state_path
from tests.conftest import TEST_SECRET
from tests.prefect_server import IDENTIFIER_FIELDS, demo_subject, free_port

ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 240


def _env(home: Path, database_url: str | None) -> dict[str, str]:
    """What a user's shell has: no Prefect settings of the test session, our home and key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ERASURE_"))}
    env.update(ERASURE_HOME=str(home), ERASURE_SECRET_KEY=TEST_SECRET, PYTHONPATH=str(ROOT))
    if database_url:
        env["ERASURE_DATABASE_URL"] = database_url
    return env


def _erasure(env: dict[str, str], *args: str, timeout: float = 300) -> dict:
    done = subprocess.run([sys.executable, "-m", "api.cli", *args, "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"erasure {' '.join(args)}: {done.stderr[-3000:]}"
    return json.loads(done.stdout)


def _without_heavy_imports(env: dict[str, str], *args: str) -> dict:
    """Runs ``erasure ARGS --json`` and asserts that it imported neither torch nor Prefect."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('HEAVY', 'torch' in sys.modules, 'prefect' in sys.modules, "
            "file=sys.stderr))\n"
            f"sys.argv = ['erasure', *{[*args, '--json']!r}]\n"
            "runpy.run_module('api.cli', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HEAVY False False" in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout)


def _wait_for_ready(process: subprocess.Popen, out: Path, err: Path) -> str:
    deadline = time.monotonic() + UP_TIMEOUT_S
    while "admin token" not in out.read_text():
        assert process.poll() is None, f"erasure up exited {process.returncode}: {err.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"erasure up not ready in {UP_TIMEOUT_S} s: {err.read_text()[-3000:]}"
        time.sleep(0.5)
    return out.read_text()


def _processes_with_home(home: Path) -> list[str]:
    """Processes whose environment names this data home (what `erasure up` started had it)."""
    needle = f"ERASURE_HOME={home}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
                found.append(f"{entry.name}: {command!r}")
        except OSError:
            continue
    return found


def _wait_for_state(base: str, token: str, request_id: str, states: set[str], logs: Path) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        answer = httpx.get(f"{base}/v1/erasure-requests/{request_id}", headers={"Authorization": f"Bearer {token}"},
                           timeout=10)
        assert answer.status_code == 200, answer.text
        if answer.json()["state"] in states:
            return answer.json()["state"]
        if time.monotonic() > deadline:
            worker = (logs / "worker-cpu.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"request still {answer.json()['state']} after {RUN_TIMEOUT_S} s\n{worker}")
        time.sleep(1)


def _persons(ground_truth: Path) -> list[dict]:
    return [r for r in map(json.loads, ground_truth.read_text().splitlines()) if r["type"] == "person"]


def _wait_for_flow_run_process(supervisor: int, timeout_s: float = 120) -> int:
    """The pid of a flow-run process a worker of ``supervisor`` started (``python -m prefect.engine``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in descendants(supervisor):
            try:
                if b"prefect.engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no flow-run process appeared within {timeout_s:.0f} s")


# SIGINT (Ctrl-C) on one backend, SIGTERM (a service manager's stop) on the other
@pytest.mark.slow
@pytest.mark.parametrize(("backend", "stop_signal"), [
    pytest.param("embedded", signal.SIGINT, id="embedded-sigint"),
    pytest.param("postgres", signal.SIGTERM, marks=pytest.mark.postgres, id="postgres-sigterm")])
def test_erasure_up_runs_the_service_and_ctrl_c_stops_everything(backend: str, stop_signal: signal.Signals,
                                                                  tmp_path: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    home = tmp_path / "home"
    database_url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    env = _env(home, database_url)
    api_port, prefect_port = free_port(), free_port()
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        up = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--api-port", str(api_port),
                               "--prefect-port", str(prefect_port)], env=env, cwd=ROOT, stdout=stdout,
                              stderr=stderr, start_new_session=True)
    try:
        from shards.demo_data import write_demo

        # ingest needs no Prefect: it runs while the service starts
        files = write_demo(tmp_path / "demo-data", 300, seed=0)
        _erasure(env, "ingest", str(files.records), "--dataset", "demo", "--shards", "2", "--slices", "2",
                 *[f"--identifier-field={field}:{kind}" for field, kind in IDENTIFIER_FIELDS])
        printed = _wait_for_ready(up, out, err)
        token = re.search(r"admin token\s+(\S+)", printed).group(1)
        assert f"http://127.0.0.1:{api_port}" in printed and f"http://127.0.0.1:{prefect_port}" in printed
        state = json.loads(state_path(home).read_text())
        assert state["prefect_api_url"] == f"http://127.0.0.1:{prefect_port}/api" and "admin_token" not in state
        assert token not in state_path(home).read_text()

        trained = _erasure(env, "train", "--dataset", "demo", "--epochs", "2", "--budget", "per-shard")
        assert trained["members"] == 2
        # the training ran on the service's Prefect server (no temporary one in the data home)
        flow = httpx.get(f"{state['prefect_api_url']}/flows/name/train-ensemble", timeout=10)
        assert flow.status_code == 200, flow.text
        runs = httpx.post(f"{state['prefect_api_url']}/flow_runs/filter",
                          json={"flows": {"id": {"any_": [flow.json()["id"]]}}}, timeout=10).json()
        assert [run["state_type"] for run in runs] == ["COMPLETED"]
        assert not (home / "prefect").exists()

        # on the trained dataset, `erasure locate`'s retrain estimate reads the schedule without torch
        subject = demo_subject(files.ground_truth)
        located = _without_heavy_imports(env, "locate", "--dataset", "demo", "-i", f"email={subject['email']}")
        assert located["retrain_estimate"]["shards_touched"] >= 1

        base = state["api_url"]
        answer = httpx.post(f"{base}/v1/erasure-requests",
                            json={"identifiers": [{"kind": "email", "value": subject["email"]}], "samples": []},
                            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "up-e2e"}, timeout=30)
        assert answer.status_code == 202, answer.text
        reached = _wait_for_state(base, token, answer.json()["id"], {"awaiting_review", "completed", "failed"},
                                  home / "up-logs")
        assert reached in ("awaiting_review", "completed")

        # stop while a worker's flow run is live: that process must not outlive `erasure up` either
        other = next(p for p in _persons(files.ground_truth) if p["email"] != subject["email"])
        answer = httpx.post(f"{base}/v1/erasure-requests",
                            json={"identifiers": [{"kind": "email", "value": other["email"]}], "samples": []},
                            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "up-e2e-2"}, timeout=30)
        assert answer.status_code == 202, answer.text
        flow_run = _wait_for_flow_run_process(up.pid)
        started = set(state["children"].values()) | descendants(up.pid)
        assert flow_run in started
        up.send_signal(stop_signal)
        assert up.wait(timeout=90) == 0, err.read_text()[-3000:]
    finally:
        if up.poll() is None:  # the test failed before stopping it: do not leave it running
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(timeout=90)
    still_there = [pid for pid in started if Path(f"/proc/{pid}").exists()]
    assert still_there == [], still_there
    assert _processes_with_home(home) == []
    assert port_is_free(api_port) and port_is_free(prefect_port)
    assert not state_path(home).exists()
    assert "stopped: every process" in err.read_text()

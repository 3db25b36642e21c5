"""infra/prefect.yaml: every deployment's entrypoint resolves to a real flow
(not Prefect's silent placeholder), its parameters are the flow's, its work
pool is cpu or gpu, and every schedule builds. One deployment runs through a real process work
pool with a `prefect worker`."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import flows.prefect_setup  # noqa: F401
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
DEPLOYMENTS = SPEC["deployments"]
RUN_TIMEOUT_S = 90


def test_the_expected_deployments_exist() -> None:
    names = {(d["entrypoint"].split(":")[1], d["name"]) for d in DEPLOYMENTS}
    assert ("process_erasure_request", "on-demand") in names
    assert ("retrain_pending", "scheduled") in names
    assert ("retrain_shard", "gpu") in names
    assert {d["work_pool"]["name"] for d in DEPLOYMENTS} == {"cpu", "gpu"}


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_is_a_real_flow(deployment: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
    assert isinstance(flow, Flow)
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(deployment.get("parameters", {})) <= accepted


@pytest.mark.parametrize("deployment", [d for d in DEPLOYMENTS if d.get("schedules")], ids=lambda d: d["name"])
def test_schedules_build(deployment: dict) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    for schedule in deployment["schedules"]:
        built = CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
        assert built.cron == schedule["cron"]


# ---------------------------------------------------------------- a real process work pool


WORKER_STOP_TIMEOUT_S = 15


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the worker's process group (the worker and any flow run it started), then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=WORKER_STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=WORKER_STOP_TIMEOUT_S)


def test_a_deployment_runs_on_a_process_work_pool(prefect_env: dict[str, str], tmp_path: Path) -> None:
    """`cpu` process pool + `prefect worker start --pool cpu` in its own process group;
    retrain_pending deployed from its entrypoint in this checkout (no build, no push),
    started with run_deployment: the run completes, in the worker's environment (our
    settings reach the flow: it creates and migrates the database it was pointed at)."""
    from prefect import Flow, get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="cpu", type="process"))
        except ObjectAlreadyExists:
            pass

    home = tmp_path / "home"
    database = home / "erasure.db"
    worker_env = {**prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                  "ERASURE_HOME": str(home), "ERASURE_DATABASE_URL": f"sqlite:///{database}",
                  "ERASURE_SECRET_KEY": TEST_SECRET, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu", "--type", "process"],
            env=worker_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            flow = Flow.from_source(source=str(ROOT), entrypoint="flows/retraining.py:retrain_pending")
            deployment_id = flow.deploy(name="it-process-pool", work_pool_name="cpu", build=False, push=False,
                                        print_next_steps=False)
            started = time.monotonic()
            run = run_deployment(deployment_id, parameters={"dataset": None}, timeout=RUN_TIMEOUT_S)
            elapsed = time.monotonic() - started
            log.flush()
            tail = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
            assert run.state is not None and run.state.is_completed(), (
                f"{run.state!r} after {elapsed:.0f} s (worker alive: {worker.poll() is None})\n{tail}")
            assert database.is_file()  # the run used the settings the worker passed on
        finally:
            _stop_group(worker)

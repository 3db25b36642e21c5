"""infra/prefect.yaml: every deployment's entrypoint resolves to a real flow
(not Prefect's silent placeholder), its parameters are the flow's, its work
pool is cpu or gpu, and every schedule builds."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

import flows.prefect_setup  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
DEPLOYMENTS = SPEC["deployments"]


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

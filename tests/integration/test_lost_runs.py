"""flows/lost_runs.py: the automation that marks a flow run Crashed when its heartbeats stop
is created once per Prefect server, with a proactive heartbeat trigger (the multi-host test
kills a host and watches it act)."""

from __future__ import annotations

import httpx


def test_the_lost_run_automation_is_created_once(prefect_env: dict[str, str]) -> None:
    from flows.lost_runs import AUTOMATION_NAME, ensure_lost_run_automation

    first = ensure_lost_run_automation(120)
    assert ensure_lost_run_automation(120) == first
    found = httpx.post(f"{prefect_env['PREFECT_API_URL']}/automations/filter", json={}, timeout=10).json()
    (automation,) = [a for a in found if a["name"] == AUTOMATION_NAME]
    trigger = automation["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == 120
    assert trigger["after"] == ["prefect.flow-run.heartbeat"] and "prefect.flow-run.heartbeat" in trigger["expect"]
    assert [a["type"] for a in automation["actions"]] == ["change-flow-run-state"]
    assert automation["actions"][0]["state"] == "CRASHED"

"""Flow runs lost with their host: a Prefect automation marks a running flow run
``Crashed`` when its heartbeats stop (the worker and the run were killed, or the
host went away), so whatever waits for it can start it again elsewhere.

Every flow run emits ``prefect.flow-run.heartbeat`` every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (default 180, at least 30; set it on
the workers). A run that goes ``within_s`` without a heartbeat or a final state
is lost: the automation (proactive trigger, one per flow run) sets it Crashed.
``dispatch_retraining`` (flows/retraining.py) then starts the shard's retraining
again on its pool, where the claim of the killed run is resumed.

Create it once per Prefect server: ``python -m flows.lost_runs [within_s]``
(the multi-host test does it through ``ensure_lost_run_automation``; ``erasure up`` does not yet).
"""

from __future__ import annotations

import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

import sys
from datetime import timedelta

AUTOMATION_NAME = "erasure-crash-lost-flow-runs"
DEFAULT_WITHIN_S = 600  # > 3 heartbeats at Prefect's default frequency (180 s)


def ensure_lost_run_automation(within_s: int = DEFAULT_WITHIN_S) -> str:
    """Create the automation unless one of this name exists; returns its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    try:
        return str(Automation.read(name=AUTOMATION_NAME).id)
    except ValueError:  # Automation.read raises ValueError when none has the name
        pass
    final = {f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Cancelled", "Crashed")}
    automation = Automation(
        name=AUTOMATION_NAME,
        description="Mark a running flow run Crashed when its heartbeats stop (its host or worker was killed).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s} s: the run's host or worker is gone")],
    ).create()
    return str(automation.id)


if __name__ == "__main__":
    print(ensure_lost_run_automation(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_WITHIN_S))

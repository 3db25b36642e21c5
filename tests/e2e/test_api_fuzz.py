"""Schemathesis against the app's own /openapi.json: generated requests, valid
and invalid (negative mode), for every operation, with a token of each scope.
Whatever the input, the answer is never a server error (5xx): bad input gets a
clear 4xx. The suite runs a fast profile on both backends; the full run
(>= 1,000 cases) is marked ``reliability``:

    python -m pytest -m reliability tests/e2e/test_api_fuzz.py -s
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from db.requests import issue_token
from db.session import unit_of_work
from db.settings import Settings

SCOPES = ("intake", "review", "audit", "screen", "admin")
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)


def fuzz(app_settings: Settings, examples: int, every_scope: bool) -> FuzzReport:
    """``examples`` cases per (operation, mode), with tokens drawn from every scope; or, with
    ``every_scope``, ``examples`` cases per (operation, mode, scope)."""
    app = create_app(app_settings)
    with unit_of_work(app.state.engine) as session:
        tokens = {scope: issue_token(session, f"fuzz-{scope}", [scope])[0] for scope in SCOPES}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            for scopes in ([(s,) for s in SCOPES] if every_scope else [SCOPES]):

                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode), scope=st.sampled_from(scopes))
                def call(case, scope: str) -> None:  # noqa: ANN001
                    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {tokens[scope]}"}
                    report.cases += 1
                    what = f"{operation.method.upper()} {operation.path} ({mode.value}, {scope})"
                    try:
                        response = case.call()
                    except Exception as exc:  # noqa: BLE001 - an unhandled exception is a server error
                        report.server_errors.append(f"{what}: raised {type(exc).__name__}: {exc}")
                        return
                    report.statuses[response.status_code] += 1
                    if response.status_code >= 500:
                        report.server_errors.append(f"{what}: {response.status_code} {response.text[:300]} "
                                                    f"for {case.path_parameters} {case.query} {case.body!r:.300}")

                call()
    app.state.engine.dispose()
    return report


def test_generated_requests_never_get_a_server_error(settings: Settings) -> None:
    report = fuzz(settings, examples=6, every_scope=False)
    assert report.cases >= 100, report
    assert not report.server_errors, "\n".join(report.server_errors[:20])
    assert any(status < 300 for status in report.statuses), report.statuses  # not only refusals


@pytest.mark.reliability
@pytest.mark.postgres
def test_a_thousand_generated_requests_never_get_a_server_error(postgres_url: str, tmp_path) -> None:  # noqa: ANN001
    from tests.conftest import TEST_SECRET

    report = fuzz(Settings(home=tmp_path / "home", database_url=postgres_url, secret_key=TEST_SECRET),
                  examples=8, every_scope=True)
    print(json.dumps({"fuzz_cases": report.cases, "server_errors": len(report.server_errors),
                      "statuses": dict(sorted(report.statuses.items()))}))
    assert report.cases >= 1000, report.cases
    assert not report.server_errors, "\n".join(report.server_errors[:20])

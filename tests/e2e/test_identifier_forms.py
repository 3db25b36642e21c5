"""Every command with `-i/--identifier` takes `kind=value` and `kind:value` alike
(request submit, locate, audit subject): the same subject either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.demo_data import read_ground_truth
from tests.e2e.test_cli import ingest_demo, run_cli

FORMS = ("=", ":")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    home = tmp_path_factory.mktemp("identifier-forms") / "home"
    _, ground_truth = ingest_demo(home, 300)
    person = next(p for p in read_ground_truth(ground_truth)["persons"] if p["originals"])
    return home, person


def test_locate_takes_both_forms(demo: tuple[Path, dict]) -> None:
    home, person = demo
    found = []
    for sep in FORMS:
        result = run_cli(["locate", "--dataset", "demo", "-i", f"email{sep}{person['email']}",
                          "-i", f"user_id{sep}{person['user_id']}", "--json"], home)
        assert result.returncode == 0, result.stderr
        found.append(sorted(m["record_id"] for m in json.loads(result.stdout)["matches"]))
    assert found[0] == found[1] and set(person["originals"]) <= set(found[0])


def test_request_submit_takes_both_forms_as_the_same_request(demo: tuple[Path, dict]) -> None:
    home, person = demo
    answers = []
    for sep in FORMS:  # the same key and the same subject: the second is a replay, not a conflict
        result = run_cli(["request", "submit", "-i", f"email{sep}{person['email']}", "--idempotency-key", "forms",
                          "--json"], home)
        assert result.returncode == 0, result.stderr
        answers.append(json.loads(result.stdout))
    assert answers[0]["id"] == answers[1]["id"] and answers[1]["replayed"] is True


def test_audit_subject_takes_both_forms(demo: tuple[Path, dict]) -> None:
    home, person = demo
    reports = []
    for sep in FORMS:
        result = run_cli(["audit", "subject", "-i", f"email{sep}{person['email']}", "--json"], home)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(result.stdout))
    assert reports[0]["records"] == reports[1]["records"] and reports[0]["records"]


@pytest.mark.parametrize("command", [["locate", "--dataset", "demo"], ["request", "submit"], ["audit", "subject"]],
                         ids=lambda c: " ".join(c[:2]))
def test_a_bad_identifier_exits_2_naming_both_forms(demo: tuple[Path, dict], command: list[str]) -> None:
    home, _ = demo
    result = run_cli([*command, "-i", "jane@example.com"], home)
    assert result.returncode == 2 and "KIND=VALUE or KIND:VALUE" in result.stderr, result.stderr

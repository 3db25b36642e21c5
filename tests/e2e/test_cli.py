"""The `erasure` command as a user runs it: separate processes, real files, JSON out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_SECRET


def run_cli(args: list[str], home: Path, database_url: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ERASURE_HOME": str(home), "ERASURE_SECRET_KEY": TEST_SECRET}
    env.pop("ERASURE_DATABASE_URL", None)
    if database_url:
        env["ERASURE_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def ingest_demo(home: Path, records: int, database_url: str | None = None) -> tuple[dict, Path]:
    """`erasure demo-data` then `erasure ingest` of it, as the README shows."""
    data_dir = home.parent / "demo-data"
    made = run_cli(["demo-data", str(data_dir), "--records", str(records), "--json"], home, database_url)
    assert made.returncode == 0, made.stderr
    files = json.loads(made.stdout)
    result = run_cli(
        ["ingest", files["records"], "--dataset", "demo", "--identifier-field", "email",
         "--identifier-field", "user_id", "--identifier-field", "name", "--json"],
        home, database_url,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), Path(files["ground_truth"])


def test_ingest_of_the_demo_dataset(tmp_path: Path, database_url: str) -> None:
    report, truth_path = ingest_demo(tmp_path / "home", 1500, database_url)
    assert report["new_records"] == 1500 and report["status"] == "ingested"
    truth = [json.loads(line) for line in truth_path.read_text().splitlines()]
    assert any(t["type"] == "copy" for t in truth)

    listed = run_cli(["shards", "--dataset", "demo", "--json"], tmp_path / "home", database_url)
    shards = json.loads(listed.stdout)["shards"]
    assert sum(s["row_count"] for s in shards) == 1500 and all(Path(s["path"]).exists() for s in shards)

    again, _ = ingest_demo(tmp_path / "home", 1500, database_url)
    assert again["status"] == "already_ingested"


def test_demo_runs_the_whole_story(tmp_path: Path) -> None:
    """The README's demo command on the embedded default (SQLite, temporary Prefect server)."""
    result = run_cli(["demo", "--records", "1000", "--embedder", "hashing", "--json"], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["state"] == "completed"
    assert report["erased"] >= report["subject"]["originals"] > 0
    for method, counts in report["found_by_method"].items():
        assert counts["erased"] <= counts["truly_the_subjects"], method  # nobody else's data erased
    assert report["retraining"] and all(r["status"] == "done" for r in report["retraining"])
    assert 0 < report["cost"]["fraction_of_full"] <= 1
    # the estimate priced before erasing is what the retraining then cost (issue 11)
    estimate = report["retrain_estimate"]
    assert estimate["samples"] == report["cost"]["sisa_samples"] and report["cost"]["estimate_agrees"] is True
    assert estimate["shards_touched"] == len(report["retraining"])
    audit = report["accountability"]
    assert audit["certificate"]["verified_offline"] and Path(audit["certificate"]["file"]).is_file()
    assert audit["certificate"]["scope"]["latent_information_and_downstream_use"] == "not addressed"
    assert {p["role"] for p in audit["membership_probe"]} == {"before", "after"}
    assert audit["audit_log"]["ok"] and audit["audit_log"]["events"] > 0
    verified = run_cli(["audit", "verify-certificate", audit["certificate"]["file"], "--public-key",
                        audit["certificate"]["public_key_file"], "--json"], tmp_path / "home")
    assert verified.returncode == 0 and json.loads(verified.stdout)["signer_proven"]


def test_bad_file_exits_2_with_row_numbers(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"id": "a", "text": "fine", "label": 1}\n{"id": "a", "text": "dup", "label": 1}\n')
    result = run_cli(["ingest", str(source), "--json"], tmp_path / "home")
    assert result.returncode == 2
    assert "row 2: duplicate id 'a'" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "x.jsonl", "--identifier-field", "ssn"], "'ssn' is not a known identifier kind"),
        (["ingest", "x.jsonl", "--shards", "0"], "--shards must be between 1 and 4096"),
        (["ingest", "x.jsonl", "--dataset", "a/b"], "invalid dataset name"),
        (["shards", "--dataset", "nothing"], "no dataset named 'nothing'"),
    ],
)
def test_bad_flags_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "x.jsonl").write_text('{"id": "a", "text": "t", "label": 0}\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run_cli(args, tmp_path / "home")
    finally:
        os.chdir(cwd)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_database_url_must_be_supported(tmp_path: Path) -> None:
    result = run_cli(["shards", "--database-url", "mysql://x"], tmp_path / "home")
    assert result.returncode == 2 and "unsupported database URL" in result.stderr

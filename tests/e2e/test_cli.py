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


def test_demo_ingests_the_demo_dataset(tmp_path: Path, database_url: str) -> None:
    result = run_cli(["demo", "--records", "1500", "--embedder", "hashing", "--json"], tmp_path / "home", database_url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert report["ingest"]["new_records"] == 1500 == report["demo_data"]["n_records"]
    truth = [json.loads(line) for line in Path(report["demo_data"]["ground_truth"]).read_text().splitlines()]
    assert any(t["type"] == "copy" for t in truth)

    listed = run_cli(["shards", "--dataset", "demo", "--json"], tmp_path / "home", database_url)
    shards = json.loads(listed.stdout)["shards"]
    assert sum(s["row_count"] for s in shards) == 1500 and all(Path(s["path"]).exists() for s in shards)

    again = run_cli(["demo", "--records", "1500", "--embedder", "hashing", "--json"], tmp_path / "home", database_url)
    assert json.loads(again.stdout)["ingest"]["status"] == "already_ingested"


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

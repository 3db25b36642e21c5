"""`erasure lineage export` as a user runs it: separate processes, real files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.e2e.test_cli import ingest_demo, run_cli


def test_export_after_an_ingest(tmp_path: Path, database_url: str) -> None:
    """One ingest run: its START and COMPLETE, to a file (summary on stdout) and to stdout."""
    home = tmp_path / "home"
    report, _ = ingest_demo(home, 200, database_url)
    out = tmp_path / "out" / "lineage.jsonl"
    out.parent.mkdir()
    result = run_cli(["lineage", "export", "--out", str(out), "--dataset", "demo", "--json"], home, database_url)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["runs"] == {"ingest": 1, "train": 0, "erase": 0, "retrain": 0} and summary["events"] == 2
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    written = {o["name"]: o["outputFacets"]["outputStatistics"]["rowCount"] for o in events[1]["outputs"]}
    assert written == {f"shard-{s}/v{v}": report["per_shard_counts"][s] for s, v in report["shard_versions"].items()}
    assert events[1]["inputs"][0]["name"] == f"source/{report['sha256']}"
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed

    to_stdout = run_cli(["lineage", "export"], home, database_url)
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stdout == out.read_text()
    assert "2 OpenLineage event(s)" in to_stdout.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "nothing", "--out", "{tmp}/x.jsonl"], "no dataset named 'nothing'"),
        (["--since", "last tuesday", "--out", "{tmp}/x.jsonl"], "--since 'last tuesday' is not an ISO 8601"),
        (["--out", "{tmp}/missing/x.jsonl"], "does not exist"),
        (["--out", "{tmp}"], "is a directory"),
        (["--json"], "give --out FILE"),
        (["--out", "/proc/lineage.jsonl"], "--out /proc/lineage.jsonl"),  # unwritable even for root
    ],
)
def test_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    home = tmp_path / "home"
    result = run_cli(["lineage", "export", *[a.format(tmp=tmp_path) for a in args]], home)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and result.stdout == ""
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_exits_2(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = run_cli(["lineage", "export", "--out", str(locked / "x.jsonl")], tmp_path / "home")
    finally:
        locked.chmod(stat.S_IRWXU)
    assert result.returncode == 2 and "is not writable" in result.stderr

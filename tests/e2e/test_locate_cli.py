"""`erasure locate` as a user runs it: JSON out, bad input exits 2, nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.demo_data import read_ground_truth
from tests.e2e.test_cli import ingest_demo, run_cli


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("locate") / "home"
    ingest_demo(home, 1200)
    return home


def test_locate_json(demo_home: Path) -> None:
    truth = read_ground_truth(demo_home.parent / "demo-data" / "ground_truth.jsonl")
    person = next(p for p in truth["persons"] if p["originals"])
    result = run_cli(["locate", "--dataset", "demo", "-i", f"email={person['email']}", "--json"], demo_home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    erased = {m["record_id"] for m in report["matches"] if m["decision"] == "erase"}
    assert set(person["originals"]) <= erased
    assert report["by_method"]["identifier"] == len(person["originals"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "needs at least one identifier or sample"),
        (["-i", "passport=X1"], "'passport' is not an identifier kind"),
        (["-i", "email"], "write KIND=VALUE or KIND:VALUE"),
        (["--sample", "word " * 24_000], "sample 1"),
    ],
)
def test_locate_bad_input(demo_home: Path, args: list[str], message: str) -> None:
    result = run_cli(["locate", "--dataset", "demo", *args], demo_home)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_locate_huge_sample_file(demo_home: Path, tmp_path: Path) -> None:
    sample = tmp_path / "huge.txt"
    sample.write_text("words " * 100_000)
    result = run_cli(["locate", "--dataset", "demo", "--sample-file", str(sample)], demo_home)
    assert result.returncode == 2 and "bytes" in result.stderr, result.stderr


def test_locate_non_utf8_sample_file(demo_home: Path, tmp_path: Path) -> None:
    sample = tmp_path / "latin1.txt"
    sample.write_bytes("caf\xe9 au lait".encode("latin-1"))
    result = run_cli(["locate", "--dataset", "demo", "--sample-file", str(sample)], demo_home)
    assert result.returncode == 2 and "UTF-8" in result.stderr

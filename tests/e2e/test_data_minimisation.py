"""Data minimisation: once a request completes, nothing we keep holds what the
subject sent. Submit and process a request through the CLI (separate
processes, their output captured as log files, a real Prefect server), then scan
a full database dump, the log files, everything Prefect stored about the runs
(parameters, logs, artifacts, results) and our data home for the raw
identifiers and the sample text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from db.settings import Settings
from tests.conftest import TEST_SECRET, database_dump
from tests.prefect_server import trained_demo

# Superseded shard versions and their locate indexes hold every record they
# were written with, the erased ones included; the certificate says so. The
# current versions must not.
SHARD_FILES = (".parquet",)


def _erasure(args: list[str], settings: Settings, env: dict, log: Path) -> dict:
    with open(log, "ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", *args, "--json", "--home", str(settings.home),
             "--database-url", settings.database_url],
            env=env, stdout=subprocess.PIPE, stderr=out, timeout=600,
        )
        out.write(done.stdout)
    assert done.returncode == 0, log.read_text()[-3000:]
    return json.loads(done.stdout)


def _prefect_records(request_id: str) -> str:
    """Everything the Prefect server holds about this request's runs, as text."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    parts: list[str] = []
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("request_id") == request_id]
        assert runs, "the flow run is not on the Prefect server"
        for run in runs:
            parts.append(run.model_dump_json())
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            parts += [entry.model_dump_json() for entry in logs]
            parts += [t.model_dump_json() for t in client.read_task_runs() if t.flow_run_id == run.id]
        parts += [a.model_dump_json() for a in client.read_artifacts()]
    return "\n".join(parts)


def _files_text(root: Path, skip_suffixes: tuple[str, ...] = ()) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not any(str(p).endswith(s) or f"{s}.dedup" in str(p) for s in skip_suffixes)}


@pytest.mark.slow
def test_nothing_kept_holds_what_the_subject_sent(database_url: str, tmp_path: Path, prefect_env: dict) -> None:
    settings = Settings(home=tmp_path / "home", database_url=database_url, secret_key=TEST_SECRET)
    demo = trained_demo(settings, records=600)
    subject = demo["subject"]
    records = {r["id"]: r for r in map(json.loads, demo["files"].records.read_text().splitlines())}
    sample = records[subject["originals"][0]]["text"]
    raw = [subject["email"], subject["name"], subject["user_id"]]

    client_home = tmp_path / "client-prefect"
    env = {**prefect_env, "PREFECT_HOME": str(client_home), "PREFECT_LOGGING_LEVEL": "DEBUG",
           "ERASURE_SECRET_KEY": TEST_SECRET, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = tmp_path / "logs" / "erasure.log"
    log.parent.mkdir()
    submitted = _erasure(["request", "submit", "-i", f"email:{subject['email']}", "-i", f"name:{subject['name']}",
                          "-i", f"user_id:{subject['user_id']}", "--sample", sample], settings, env, log)
    request_id = submitted["request_id"] if "request_id" in submitted else submitted["id"]
    done = _erasure(["request", "process", request_id, "--dataset", "demo", "--on-review-timeout", "erase"],
                    settings, env, log)
    assert done["state"] == "completed", done
    assert done["erased"] >= len(subject["originals"])

    haystacks: dict[str, bytes] = {
        "database dump": database_dump(settings.database_url).encode(),
        "CLI log file": log.read_bytes(),
        "Prefect server (runs, parameters, logs, task runs, artifacts)": _prefect_records(request_id).encode(),
    }
    haystacks |= {f"client Prefect home {p}": b for p, b in _files_text(client_home).items()}
    haystacks |= {f"data home {p}": b for p, b in _files_text(settings.home, SHARD_FILES).items()
                  if "demo-data" not in p.parts}  # the test's own input file
    needles = [v.encode() for v in raw] + [v.lower().encode() for v in raw]
    words = sample.split()
    # any eight consecutive words of the sample
    needles += [" ".join(words[i:i + 8]).encode() for i in range(0, max(1, len(words) - 7))]
    source = demo["files"].records.read_bytes().lower()  # the needles do find what is there
    assert all(n.lower() in source for n in needles[:3]) and needles[-1].lower() in source
    for where, data in haystacks.items():
        lowered = data.lower()
        for needle in needles:
            assert needle.lower() not in lowered, f"{needle!r} found in {where}"
    # and the current shard versions no longer hold the sample's record
    import pyarrow.parquet as pq

    from db.lineage import latest_shard_versions
    from db.session import unit_of_work
    from pipeline.database import open_database

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            dataset_id = 1
            current = list(latest_shard_versions(session, dataset_id).values())
    finally:
        engine.dispose()
    for version in current:
        texts = pq.read_table(version.path, columns=["text"])["text"].to_pylist()
        assert sample not in texts

"""Data minimisation: once a request completes, nothing we keep holds what the
subject sent or what was erased. Submit and process a request through the CLI
(separate processes, their output captured as log files, a real Prefect server),
then scan a full database dump, the SQLite file and its write-ahead log byte by
byte, the log files, everything Prefect stored about the runs (parameters, logs,
artifacts, results) and every file of our data home (temporary areas included;
Parquet files and the ``.dedup`` index folders read column by column, since
Parquet compresses) for the raw identifiers, the sample text, the erased records'
texts and ids, and the plain SHA-256 of each erased text (a confirmation oracle);
then run ``erasure audit residue`` and expect it clean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from db.settings import Settings
from tests.conftest import TEST_SECRET, database_dump
from tests.prefect_server import trained_demo

import hashlib

import pyarrow.parquet as pq


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


def _files_text(root: Path) -> dict[Path, bytes]:
    """Every file's bytes; a Parquet file (compressed) as the text of all its string columns."""
    out = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            out[path] = "\n".join(str(v) for name in table.column_names
                                  for v in table[name].to_pylist() if isinstance(v, str)).encode()
        else:
            out[path] = path.read_bytes()
    return out


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

    erased_ids = _erased_record_ids(settings, request_id)
    assert set(subject["originals"]) <= erased_ids
    erased_texts = [records[rid]["text"] for rid in sorted(erased_ids)]
    haystacks: dict[str, bytes] = {
        "database dump": database_dump(settings.database_url).encode(),
        "CLI log file": log.read_bytes(),
        "Prefect server (runs, parameters, logs, task runs, artifacts)": _prefect_records(request_id).encode(),
    }
    haystacks |= {f"client Prefect home {p}": b for p, b in _files_text(client_home).items()}
    home_files = {p: b for p, b in _files_text(settings.home).items()
                  if "demo-data" not in p.parts}  # the test's own input file (upstream: listed, not ours to delete)
    haystacks |= {f"data home {p}": b for p, b in home_files.items()}
    if settings.database_url.startswith("sqlite"):
        db_file = Path(settings.database_url.split("///", 1)[1])
        for path in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-journal")):
            if path.exists():  # freed pages and old log frames, not only the live rows a dump shows
                haystacks[f"SQLite file {path.name}"] = path.read_bytes()
    assert not [p for p in home_files if ".tmp-" in p.name or ".old-" in p.name or "ingest-" in str(p)], \
        "temporary files left in the data home"
    needles = [v.encode() for v in raw] + [v.lower().encode() for v in raw]
    words = sample.split()
    # any eight consecutive words of the sample; every erased text whole (the demo's texts share
    # template phrases with other people's, so shorter windows of them are not the subject's)
    needles += [" ".join(words[i:i + 8]).encode() for i in range(0, max(1, len(words) - 7))]
    needles += [text.encode() for text in erased_texts]
    # the plain SHA-256 of each erased text: whoever holds a guessed text could confirm it was trained on
    digests = [hashlib.sha256(t.encode("utf-8")).hexdigest().encode() for t in erased_texts]
    source = demo["files"].records.read_bytes().lower()  # the needles do find what is there
    assert all(n.lower() in source for n in needles[:3]) and needles[-1].lower() in source.replace(b"\\n", b"\n")
    # Live training data holds other people's texts, which share the demo's template phrases:
    # there the sample and the erased texts are looked for whole.
    whole = [v.encode() for v in raw] + [sample.encode()] + [text.encode() for text in erased_texts]
    for where, data in haystacks.items():
        lowered = data.lower()
        for needle in (whole if where.endswith(".parquet") else needles) + digests:
            assert needle.lower() not in lowered, f"{needle[:60]!r} found in {where}"
    # the erased records' ids: in no Parquet file (shard versions, locate indexes) under the data home
    for path, data in home_files.items():
        if path.suffix == ".parquet":
            present = set(data.decode().split("\n")) & erased_ids
            assert not present, f"{len(present)} erased record id(s) in {path}"
    residue = _erasure(["audit", "residue", request_id], settings, env, log)
    assert residue["clean"], json.dumps(residue["summary"])
    assert residue["shards"]["hit_count"] == 0 and residue["database"]["hits"] == 0
    assert residue["prefect"]["status"] == "clean", residue["prefect"]
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


def _erased_record_ids(settings: Settings, request_id: str) -> set[str]:
    from sqlalchemy import select

    from db.session import unit_of_work
    from db.training import RequestMatch
    from pipeline.database import open_database

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return set(session.scalars(select(RequestMatch.record_id).where(
                RequestMatch.request_id == request_id, RequestMatch.erased_in_shard_version.is_not(None))))
    finally:
        engine.dispose()

"""Audit query benchmark: the four compliance queries over a PostgreSQL lineage of N records.

    .venv/bin/python benchmarks/bench_audit.py --records 1000000     # ~3-6 min on 2 cores
    .venv/bin/python benchmarks/bench_audit.py --records 20000 --runs 10   # a quick look

The lineage is synthetic but consistent with the schema and with what the flows
write (bulk-loaded with COPY, far faster than an ingest): one dataset of S shards
and R slices; 95% of the records are originals of persons (five each, with an
email and a user id hashed as at ingest), 5% are copies of requested persons'
posts without identifiers. Erasure requests name a person's email; processed
requests are erased in rounds, each round writing a new version of every shard
it touches, then one retraining job per shard (checkpoints from the earliest
affected slice, a new ensemble version whose parent is the previous one); the
last requests are still open, with deadlines around now. Every request has its
state history and the matching hash-chained audit events.

Each query runs ``--runs`` times in a fresh transaction with different inputs
(requests, subjects, ensemble versions); figures are the median and p95 in
milliseconds. ``seq_scans`` lists any sequential scan on a table of more than
10,000 rows in the plans (EXPLAIN of every statement the query issued): it
should be empty. Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db.audit import GENESIS_HASH, canonical_json, event_body, event_hash  # noqa: E402
from db.audit_queries import due_requests, ensemble_reflections, request_timeline, subject_lineage  # noqa: E402
from db.session import make_engine, unit_of_work, upgrade_to_head  # noqa: E402
from dedup.identifiers import key_id, keyed_hash  # noqa: E402
from pipeline.lifecycle import OPEN_STATES  # noqa: E402

console = Console(stderr=True)
KEY = b"benchmark-secret-key-0123456789"
SHARDS, SLICES = 8, 4
PER_PERSON = 5
COPY_SHARE = 0.05
ROUND = 50  # requests erased per round (one shard version + one retraining per touched shard)
OPEN_REQUESTS = 500
BIG_TABLE_ROWS = 10_000
PROCESSED_STATES = ("received", "locating", "erasing", "awaiting_retrain", "retraining", "verifying", "completed")


def _place(i: int) -> tuple[int, int]:
    h = (i * 2654435761 + 97) & 0xFFFFFFFF
    return h % SHARDS, (h >> 8) % SLICES


def _hex(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def _email(person: int) -> str:
    return f"person{person}@example.org"


class Lineage:
    """The synthetic rows, generated table by table into COPY."""

    def __init__(self, n_records: int, n_requests: int, seed: int) -> None:
        self.n = n_records
        self.n_originals = int(n_records * (1 - COPY_SHARE))
        self.persons = self.n_originals // PER_PERSON
        rng = random.Random(seed)
        n_requests = min(n_requests, self.persons)
        self.requested = sorted(rng.sample(range(self.persons), n_requests))  # persons with a request
        self.processed = self.requested[: max(0, n_requests - OPEN_REQUESTS)]
        self.request_of = {p: str(uuid.UUID(int=rng.getrandbits(128), version=4)) for p in self.requested}
        self.copies: dict[int, list[int]] = defaultdict(list)  # person -> their copies' record numbers
        for j in range(self.n_originals, n_records):
            self.copies[self.requested[j % len(self.requested)]].append(j)
        self.now = datetime.now(timezone.utc)
        self.t0 = self.now - timedelta(days=400)
        self.erased_in: dict[int, int] = {}  # record number -> shard version it was erased in
        self.rounds: list[dict] = []
        self._plan_rounds()

    def records_of(self, person: int) -> list[int]:
        return list(range(person * PER_PERSON, person * PER_PERSON + PER_PERSON)) + self.copies.get(person, [])

    def _plan_rounds(self) -> None:
        version = {s: 1 for s in range(SHARDS)}
        for start in range(0, len(self.processed), ROUND):
            batch = self.processed[start:start + ROUND]
            touched: dict[int, list[int]] = defaultdict(list)
            for person in batch:
                for i in self.records_of(person):
                    touched[_place(i)[0]].append(i)
            new_versions = {}
            for shard, records in sorted(touched.items()):
                version[shard] += 1
                new_versions[shard] = version[shard]
                for i in records:
                    self.erased_in[i] = version[shard]
            self.rounds.append({"requests": batch, "versions": new_versions,
                                "restore": {s: min(_place(i)[1] for i in rs) for s, rs in touched.items()},
                                "at": self.t0 + timedelta(days=1 + len(self.rounds) * 300 / max(1, len(self.processed) // ROUND))})
        self.final_version = version


def _copy(conn: psycopg.Connection, table: str, columns: tuple[str, ...], rows, progress: Progress, total: int) -> int:  # noqa: ANN001
    task = progress.add_task(f"COPY {table}", total=total)
    count = 0
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
            if count % 20_000 == 0:
                progress.update(task, completed=count)
    progress.update(task, completed=count, total=count)
    return count


def load(url: str, data: Lineage) -> dict:
    """Bulk-load the lineage; returns row counts per table."""
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    counts: dict[str, int] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    with psycopg.connect(libpq) as conn, progress:
        conn.execute("INSERT INTO datasets (id, name, seed, n_shards, n_slices, feature_dim, embedder, key_id, created_at) "
                     "VALUES (1, 'bench', 0, %s, %s, 256, 'hashing', %s, %s)", (SHARDS, SLICES, key_id(KEY), data.t0))
        conn.execute("INSERT INTO source_files (id, dataset_id, path, sha256, format, row_count, new_record_count, "
                     "ingested_at) VALUES (1, 1, '/bench/records.jsonl', %s, 'jsonl', %s, %s, %s)",
                     (_hex("source"), data.n, data.n, data.t0))

        def records():
            for i in range(data.n):
                shard, slc = _place(i)
                yield (1, f"r{i:08d}", shard, slc, _hex("content", i)[:64], 1, i, 1, data.erased_in.get(i))

        counts["records"] = _copy(conn, "records", ("dataset_id", "record_id", "shard", "slice", "content_hmac",
                                                    "source_file_id", "row_number", "first_shard_version",
                                                    "erased_in_shard_version"), records(), progress, data.n)

        def identifiers():
            for i in range(data.n_originals):
                person = i // PER_PERSON
                yield ("email", keyed_hash(KEY, "email", _email(person)), 1, f"r{i:08d}")
                yield ("user_id", keyed_hash(KEY, "user_id", f"u{person}"), 1, f"r{i:08d}")

        counts["record_identifiers"] = _copy(conn, "record_identifiers", ("kind", "keyed_hash", "dataset_id", "record_id"),
                                             identifiers(), progress, 2 * data.n_originals)
        counts.update(_load_training(conn, data, progress))
        counts.update(_load_requests(conn, data, progress))
        for table in ("records", "record_identifiers", "shard_versions", "checkpoints", "ensemble_versions",
                      "ensemble_members", "shard_retrain_jobs", "request_matches", "erasure_requests",
                      "request_identifiers", "request_events", "audit_events"):
            conn.execute(f"ANALYZE {table}")
        for seq in ("shard_versions", "ensemble_versions", "shard_retrain_jobs", "request_matches",
                    "request_identifiers", "request_events"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{seq}', 'id'), (SELECT coalesce(max(id), 1) FROM {seq}))")
    return counts


def _load_training(conn: psycopg.Connection, data: Lineage, progress: Progress) -> dict:
    """Shard versions, checkpoints, ensemble versions and members, retraining jobs."""
    versions = [(1, s, 1, data.t0, "ingest") for s in range(SHARDS)]
    checkpoints = [(s, k, 1, data.t0) for s in range(SHARDS) for k in range(SLICES)]
    members = {s: _hex("ckpt", s, SLICES - 1, 1) for s in range(SHARDS)}
    ensembles = [(1, _hex("ensemble", 0), None, "train", data.t0, dict(members))]
    jobs = []
    for number, rnd in enumerate(data.rounds, start=1):
        for shard, version in rnd["versions"].items():
            versions.append((1, shard, version, rnd["at"], f"erasure:request:{rnd['requests'][0]}"))
        for shard, version in rnd["versions"].items():
            at = rnd["at"] + timedelta(hours=1 + shard)
            checkpoints += [(shard, k, version, at) for k in range(rnd["restore"][shard], SLICES)]
            members[shard] = _hex("ckpt", shard, SLICES - 1, version)
            version_id = _hex("ensemble", number, shard)
            jobs.append((len(jobs) + 1, shard, rnd["at"] + timedelta(days=20), version, version_id,
                         rnd["restore"][shard], rnd["at"], at))
            ensembles.append((len(ensembles) + 1, version_id, ensembles[-1][1], f"retrain:job:{len(jobs)}", at,
                              dict(members)))
    job_of: dict[tuple[int, int], int] = {}
    index = 0
    for number, rnd in enumerate(data.rounds, start=1):
        for shard in rnd["versions"]:
            job_of[(number, shard)] = jobs[index][0]
            index += 1
    data.job_of = job_of
    data.ensemble_ids = [e[1] for e in ensembles]
    counts = {}
    counts["shard_versions"] = _copy(conn, "shard_versions", ("id", "dataset_id", "shard", "version", "path", "sha256",
                                                              "row_count", "created_by", "created_at"),
                                     ((n, d, s, v, f"/bench/shard-{s:05d}/v{v:06d}.parquet", _hex("sv", s, v),
                                       data.n // SHARDS, by, at)
                                      for n, (d, s, v, at, by) in enumerate(versions, start=1)), progress, len(versions))
    counts["checkpoints"] = _copy(conn, "checkpoints", ("dataset_id", "key", "shard", "slice", "shard_version", "path",
                                                        "sha256", "records_seen", "created_at"),
                                  ((1, _hex("ckpt", s, k, v), s, k, v, f"/bench/ckpt/{s}/{k}/{v}.pt", _hex("f", s, k, v),
                                    (k + 1) * data.n // (SHARDS * SLICES), at) for s, k, v, at in checkpoints),
                                  progress, len(checkpoints))
    counts["ensemble_versions"] = _copy(conn, "ensemble_versions", ("id", "dataset_id", "version_id", "parent_version_id",
                                                                    "manifest_path", "created_by", "created_at"),
                                        ((n, 1, vid, parent, f"/bench/ensembles/{vid}.json", by, at)
                                         for n, vid, parent, by, at, _ in ensembles), progress, len(ensembles))
    counts["ensemble_members"] = _copy(conn, "ensemble_members", ("ensemble_id", "shard", "dataset_id", "checkpoint_key"),
                                       ((n, s, 1, key) for n, *_, m in ensembles for s, key in sorted(m.items())),
                                       progress, len(ensembles) * SHARDS)
    counts["shard_retrain_jobs"] = _copy(
        conn, "shard_retrain_jobs",
        ("id", "dataset_id", "shard", "status", "due_at", "target_shard_version", "ensemble_version_id",
         "restored_slice", "samples_processed", "full_training_samples", "wall_seconds", "device", "created_at",
         "started_at", "finished_at"),
        ((jid, 1, s, "done", due, v, vid, r, 1000, 4000, 1.5, "cpu", at, at, done)
         for jid, s, due, v, vid, r, at, done in jobs), progress, len(jobs))
    return counts


def _load_requests(conn: psycopg.Connection, data: Lineage, progress: Progress) -> dict:
    """Requests, their identifiers, matches, state history and audit events."""
    rng = random.Random(7)
    requests, identifiers, matches, events, audit = [], [], [], [], []
    prev = GENESIS_HASH

    def log(at: datetime, actor: str, request_id: str, kind: str, details: dict) -> None:
        nonlocal prev
        body = canonical_json(details)
        event_id = len(audit) + 1
        digest = event_hash(prev, event_id, event_body(at, actor, request_id, kind, body))
        audit.append((event_id, at, actor, request_id, kind, body, prev, digest))
        prev = digest

    def history(request_id: str, states: tuple[str, ...], at: datetime) -> None:
        previous = None
        for step, state in enumerate(states):
            moment = at + timedelta(minutes=step)
            action = "submitted" if previous is None else "transition"
            events.append((request_id, moment, "bench", action, previous, state, None))
            log(moment, "bench", request_id, f"request.{action}", {"from_state": previous, "to_state": state,
                                                                     "reason": None})
            previous = state

    for number, rnd in enumerate(data.rounds, start=1):
        for person in rnd["requests"]:
            rid = data.request_of[person]
            received = rnd["at"] - timedelta(days=3)
            requests.append((rid, person, "completed", received, received + timedelta(days=30), rnd["at"]))
            history(rid, PROCESSED_STATES, received)
            for i in data.records_of(person):
                shard, slc = _place(i)
                copy = i >= data.n_originals
                matches.append((rid, shard, rnd["versions"][shard] - 1, slc, f"r{i:08d}",
                                "minhash" if copy else "identifier", "jaccard" if copy else "exact",
                                0.9 if copy else 1.0, data.erased_in[i], data.job_of[(number, shard)], rnd["at"]))
            log(rnd["at"], "flow:erase", rid, "shard.erased", {"shards": len(rnd["versions"])})
    for person in data.requested[len(data.processed):]:
        rid = data.request_of[person]
        received = data.now - timedelta(days=rng.uniform(0, 45))
        state = rng.choice(("received", "locating", "awaiting_review"))
        requests.append((rid, person, state, received, received + timedelta(days=30), None))
        history(rid, PROCESSED_STATES[: PROCESSED_STATES.index(state) + 1] if state != "awaiting_review"
                else ("received", "locating", "awaiting_review"), received)
    for rid, person, *_ in requests:
        identifiers.append((rid, "email", keyed_hash(KEY, "email", _email(person))))

    counts = {}
    counts["erasure_requests"] = _copy(
        conn, "erasure_requests",
        ("id", "idempotency_key", "body_fingerprint", "state", "received_at", "original_due_at", "due_at",
         "extension_months", "submitted_by", "identifier_count", "sample_count", "closed_at", "updated_at"),
        ((rid, f"key-{rid}", _hex("body", rid), state, received, due, due, 0, "bench", 1, 0, closed, closed or received)
         for rid, _, state, received, due, closed in requests), progress, len(requests))
    counts["request_identifiers"] = _copy(conn, "request_identifiers", ("request_id", "kind", "keyed_hash"),
                                          identifiers, progress, len(identifiers))
    counts["request_events"] = _copy(conn, "request_events", ("request_id", "at", "actor", "action", "from_state",
                                                              "to_state", "reason"), events, progress, len(events))
    counts["request_matches"] = _copy(
        conn, "request_matches",
        ("request_id", "dataset_id", "match_ref", "shard", "shard_version", "slice", "record_id", "method", "metric",
         "score", "decision", "hop", "query", "final_decision", "erased_in_shard_version", "retrain_job_id", "found_at"),
        ((rid, 1, f"{s}/{rec}", s, v, slc, rec, method, metric, score, "erase", 0, "q", "erase", erased, job, at)
         for rid, s, v, slc, rec, method, metric, score, erased, job, at in matches), progress, len(matches))
    counts["audit_events"] = _copy(conn, "audit_events", ("id", "at", "actor", "request_id", "kind", "details",
                                                          "prev_hash", "hash"), audit, progress, len(audit))
    return counts


# ---------------------------------------------------------------- timing


class StatementLog:
    """The SQL statements an engine runs (to EXPLAIN them afterwards)."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        from sqlalchemy import event

        self.statements: list[tuple[str, object]] = []
        self.on = False
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if self.on and statement.lstrip().upper().startswith(("SELECT", "WITH")):
            self.statements.append((statement, parameters))


def _seq_scans(plan: dict, big: set[str]) -> list[str]:
    found = []
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") in big:
        found.append(plan["Relation Name"])
    for child in plan.get("Plans", []):
        found += _seq_scans(child, big)
    return found


def time_query(engine, log: StatementLog, name: str, inputs: list, run, big: set[str]) -> dict:  # noqa: ANN001
    """Median and p95 over the inputs (one fresh transaction each), and the plans' big sequential scans."""
    with unit_of_work(engine) as session:
        run(session, inputs[0])  # warm the connection and the statement cache
    seconds = []
    sizes = []
    for item in inputs:
        with unit_of_work(engine) as session:
            started = time.perf_counter()
            result = run(session, item)
            seconds.append(time.perf_counter() - started)
        sizes.append(result)
    log.statements.clear()
    log.on = True
    with unit_of_work(engine) as session:
        run(session, inputs[-1])
    log.on = False
    scans: set[str] = set()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in log.statements:
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            scans.update(_seq_scans(cursor.fetchone()[0][0]["Plan"], big))
    finally:
        raw.close()
    ms = sorted(s * 1000 for s in seconds)
    figures = {"runs": len(ms), "median_ms": round(statistics.median(ms), 2),
               "p95_ms": round(ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], 2),
               "max_ms": round(ms[-1], 2), "statements": len(log.statements), "seq_scans": sorted(scans),
               "result_size_median": statistics.median(sizes)}
    console.log(f"{name}: median {figures['median_ms']} ms, p95 {figures['p95_ms']} ms")
    return figures


def measure(url: str, data: Lineage, runs: int, counts: dict) -> dict:
    engine = make_engine(url)
    log = StatementLog(engine)
    big = {table for table, n in counts.items() if n > BIG_TABLE_ROWS}
    rng = random.Random(11)
    processed = [data.request_of[p] for p in data.processed]
    results = {}
    try:
        results["timeline"] = time_query(
            engine, log, "timeline", rng.sample(processed, min(runs, len(processed))),
            lambda s, rid: len(request_timeline(s, rid).entries), big)
        results["due"] = time_query(
            engine, log, "due", [1 + k % 30 for k in range(runs)],
            lambda s, days: (lambda r: len(r.overdue) + len(r.due_soon))(
                due_requests(s, open_states=OPEN_STATES, within_days=days)), big)
        subjects = rng.sample(data.requested, min(runs, len(data.requested)))
        results["subject_requested"] = time_query(
            engine, log, "subject (requested, with copies)", subjects,
            lambda s, p: len(subject_lineage(s, [("email", keyed_hash(KEY, "email", _email(p)))]).records), big)
        others = rng.sample(range(data.persons), runs)
        results["subject_any"] = time_query(
            engine, log, "subject (any person, by two identifiers)", others,
            lambda s, p: len(subject_lineage(s, [("email", keyed_hash(KEY, "email", _email(p))),
                                                 ("user_id", keyed_hash(KEY, "user_id", f"u{p}"))],
                                             dataset="bench").records), big)
        versions = rng.sample(data.ensemble_ids, min(runs, len(data.ensemble_ids)))
        results["ensemble_random"] = time_query(
            engine, log, "ensemble (random versions)", versions,
            lambda s, v: len(ensemble_reflections(s, v).reflected), big)
        results["ensemble_current"] = time_query(
            engine, log, "ensemble (the current version: reflects every processed request)",
            [data.ensemble_ids[-1]] * max(5, runs // 5),
            lambda s, v: len(ensemble_reflections(s, v).reflected), big)
    finally:
        engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=5_000, help="erasure requests (the last 500 stay open)")
    parser.add_argument("--runs", type=int, default=50, help="runs of each query (different inputs)")
    parser.add_argument("--database-url", help="an EMPTY PostgreSQL database to use and keep (default: create one "
                        "on $ERASURE_TEST_POSTGRES_URL's server and drop it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    admin = os.environ.get("ERASURE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    admin = admin.replace("postgresql+psycopg://", "postgresql://")
    name = None
    if args.database_url:
        url = args.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    else:
        name = f"erasure_bench_audit_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = "postgresql+psycopg://" + admin.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
    try:
        started = time.perf_counter()
        upgrade_to_head(url)
        data = Lineage(args.records, args.requests, args.seed)
        console.log(f"{args.records} records, {len(data.requested)} requests ({len(data.processed)} processed in "
                    f"{len(data.rounds)} rounds)")
        counts = load(url, data)
        load_s = time.perf_counter() - started
        console.log(f"loaded in {load_s:.1f}s")
        queries = measure(url, data, args.runs, counts)
    finally:
        if name is not None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps({
        "benchmark": "audit_queries",
        "backend": "postgresql",
        "records": args.records,
        "shards": SHARDS,
        "slices": SLICES,
        "rows": counts,
        "load_s": round(load_s, 1),
        "queries": queries,
        "note": "median/p95 over different inputs, each in a fresh transaction; seq_scans lists sequential scans "
                f"on tables of more than {BIG_TABLE_ROWS} rows in the queries' plans",
    }, indent=2))


if __name__ == "__main__":
    main()

"""Intake benchmark: POST /v1/erasure-requests on loopback against PostgreSQL.

Creates a fresh PostgreSQL database, brings its schema to head, issues a token
with the ``intake`` scope, starts a real uvicorn server (``api.app:create_app``
as a factory, ``--workers`` processes) on 127.0.0.1 at a free port, and runs
``--clients`` threads, each with its own keep-alive ``httpx.Client``, posting
distinct requests (unique Idempotency-Key, identifier and sample) for
``--seconds`` or until ``--max-requests`` in all. Afterwards every 202 answer's
id must be a row of ``erasure_requests`` (``lost`` counts those that are not).

In the same run, with the same uvicorn settings, clients and duration, it
measures the physical limit: a bare FastAPI endpoint doing one INSERT of the
same body (``benchmarks/bare_intake_app.py``) on the same PostgreSQL, and
reports ours as a ratio of it. Both servers run at once and are measured in
alternating windows (``--rounds``), so that other load on the machine falls on
both alike. The servers are stopped and the database dropped in every case.

Prints one JSON document. Goals: ours/bare >= 0.5; >= 1,000 requests/s, p99 <= 50 ms, 0 lost.

    .venv/bin/python benchmarks/bench_intake.py --clients 8 --seconds 20   # --workers: one per core
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.prefect_server import free_port, stop_process_group, wait_until_answering  # noqa: E402  (one copy of each)

GOAL_RATIO_TO_BARE = 0.5
GOAL_RPS = 1_000
GOAL_P99_MS = 50.0
SECRET = "benchmark-secret-key-0123456789abcdef"
PATH = "/v1/erasure-requests"
BARE_PATH = "/bare"
WARMUP_PER_CLIENT = 20
STARTUP_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 10


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def _start_server(app: str, port: int, workers: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    code = (
        f"import uvicorn; uvicorn.run({app!r}, factory=True, host='127.0.0.1', "
        f"port={port}, workers={workers}, log_level='warning', access_log=False)"
    )
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


class _Client(threading.Thread):
    def __init__(self, n: int, base: str, path: str, token: str, run_id: str, start: threading.Barrier,
                 stop_at: list[float], budget: threading.Semaphore) -> None:
        super().__init__(daemon=True, name=f"client-{n}")
        self.n, self.base, self.path, self.token, self.run_id = n, base, path, token, run_id
        self.start_barrier, self.stop_at, self.budget = start, stop_at, budget
        self.latencies_ms: list[float] = []
        self.accepted_ids: list[str] = []
        self.errors: dict[str, int] = {}
        self.sent = 0

    def _post(self, client, i: int) -> tuple[float, str | None]:  # noqa: ANN001
        key = f"{self.run_id}-{self.n}-{i}"
        body = {"identifiers": [{"kind": "user_id", "value": f"user-{self.run_id}-{self.n}-{i}"}],
                "samples": [f"benchmark sample text {self.n} {i} written by the subject"]}
        started = time.perf_counter()
        try:
            response = client.post(self.path, json=body, headers={"Idempotency-Key": key})
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            return (time.perf_counter() - started) * 1000, None
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 202:
            self.errors[str(response.status_code)] = self.errors.get(str(response.status_code), 0) + 1
            return elapsed, None
        return elapsed, response.json()["id"]

    def run(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=REQUEST_TIMEOUT_S,
                          limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as client:
            i = 0
            for _ in range(WARMUP_PER_CLIENT):  # connection set up, server code paths warm
                _, rid = self._post(client, i)
                if rid:
                    self.accepted_ids.append(rid)
                i += 1
            self.warmup_errors, self.errors = self.errors, {}
            self.start_barrier.wait(timeout=60)
            while time.perf_counter() < self.stop_at[0] and self.budget.acquire(blocking=False):
                elapsed, rid = self._post(client, i)
                i += 1
                self.sent += 1
                self.latencies_ms.append(elapsed)
                if rid:
                    self.accepted_ids.append(rid)


def _window(base: str, path: str, token: str, seconds: float, args: argparse.Namespace) -> dict:
    """``args.clients`` threads against ``base + path`` for ``seconds`` (after their warm-up): raw figures."""
    run_id = uuid.uuid4().hex[:8]
    barrier = threading.Barrier(args.clients + 1)
    stop_at = [float("inf")]
    budget = threading.Semaphore(args.max_requests)
    clients = [_Client(n, base, path, token, run_id, barrier, stop_at, budget) for n in range(args.clients)]
    for client in clients:
        client.start()
    barrier.wait(timeout=120)
    started = time.perf_counter()
    stop_at[0] = started + seconds
    for client in clients:
        client.join(timeout=seconds + REQUEST_TIMEOUT_S + 30)
    errors: Counter = Counter()
    for client in clients:
        errors.update(client.errors)
    return {
        "seconds": time.perf_counter() - started,
        "latencies_ms": [ms for client in clients for ms in client.latencies_ms],
        "sent": sum(client.sent for client in clients),
        "errors": errors,
        "warmup_errors": sum(sum(getattr(c, "warmup_errors", {}).values()) for c in clients),
        "hung_clients": sum(client.is_alive() for client in clients),
        "accepted": {rid for client in clients for rid in client.accepted_ids},
        "requests_with_warmup": sum(client.sent for client in clients) + WARMUP_PER_CLIENT * args.clients,
    }


def _group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of group ``pgid`` (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _summary(windows: list[dict], cpu_s: float) -> dict:
    """One server's windows together: throughput over their summed duration, latency percentiles."""
    latencies = sorted(ms for w in windows for ms in w["latencies_ms"])
    elapsed = sum(w["seconds"] for w in windows)
    errors: Counter = sum((w["errors"] for w in windows), Counter())
    sent = sum(w["sent"] for w in windows)
    ok = sent - sum(errors.values())
    rps = ok / elapsed if elapsed > 0 else 0.0
    p50, p95, p99 = (_percentile(latencies, q) for q in (0.50, 0.95, 0.99))
    return {
        "requests": sent,
        "accepted_202": ok,
        "warmup_errors": sum(w["warmup_errors"] for w in windows),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(rps, 1),
        "p50_ms": round(p50, 2),
        "p95_ms": round(p95, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "hung_clients": max(w["hung_clients"] for w in windows),
        "server_cpu_ms_per_request": round(1000 * cpu_s / max(1, sum(w["requests_with_warmup"] for w in windows)), 3),
        "_accepted": set().union(*(w["accepted"] for w in windows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured duration of each server (default 20)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating windows per server, of seconds/rounds each (default 4)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop a window after this many")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="uvicorn worker processes (default: one per core)")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "ERASURE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0 < args.seconds <= 600 and args.max_requests > 0 and 1 <= args.workers <= 32
            and 1 <= args.rounds <= 20):
        parser.error("need 1..256 clients, 0 < seconds <= 600, max-requests > 0, 1..32 workers, 1..20 rounds")

    from sqlalchemy import select, text

    from benchmarks.bare_intake_app import CREATE_TABLE, TABLE
    from db.requests import ErasureRequest, issue_token
    from db.session import make_engine, unit_of_work, upgrade_to_head

    admin = args.postgres_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"erasure_bench_{uuid.uuid4().hex[:8]}"
    url = "postgresql+psycopg://" + admin.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp, psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        engine = None
        try:
            upgrade_to_head(url)
            engine = make_engine(url)
            with unit_of_work(engine) as session:
                token, _ = issue_token(session, "bench-intake", ["intake"])
                session.execute(CREATE_TABLE)
            env = {**os.environ, "ERASURE_HOME": str(Path(tmp) / "home"), "ERASURE_DATABASE_URL": url,
                   "ERASURE_SECRET_KEY": SECRET, "PYTHONPATH": str(ROOT)}
            # Both servers up at once; measured in alternating windows, so that a change in the
            # machine's load during the run falls on both alike.
            servers, logs = {}, {"ours": Path(tmp) / "ours.log", "bare": Path(tmp) / "bare.log"}
            apps = {"ours": ("api.app:create_app", PATH), "bare": ("benchmarks.bare_intake_app:create_bare_app",
                                                                   BARE_PATH)}
            windows: dict[str, list[dict]] = {"ours": [], "bare": []}
            cpu_s = {"ours": 0.0, "bare": 0.0}
            try:
                for name_, (app, _) in apps.items():
                    port = free_port()
                    servers[name_] = (_start_server(app, port, args.workers, env, logs[name_]),
                                      f"http://127.0.0.1:{port}")
                for name_, (server, base) in servers.items():
                    wait_until_answering(server, f"{base}/openapi.json", logs[name_], STARTUP_TIMEOUT_S)
                for _ in range(args.rounds):
                    for name_, (server, base) in servers.items():
                        before = _group_cpu_s(server.pid)
                        windows[name_].append(_window(base, apps[name_][1], token, args.seconds / args.rounds, args))
                        cpu_s[name_] += _group_cpu_s(server.pid) - before
            finally:
                for server, _ in servers.values():
                    stop_process_group(server)
            ours, bare = (_summary(windows[n], cpu_s[n]) for n in ("ours", "bare"))
            for name_, figures in (("ours", ours), ("bare", bare)):
                failed = figures["errors"] or figures["hung_clients"]
                figures["server_log_tail"] = logs[name_].read_text(errors="replace")[-2000:] if failed else ""
            with unit_of_work(engine) as session:
                stored = set(session.scalars(select(ErasureRequest.id)))
                bare_stored = set(session.scalars(select(text("id")).select_from(text(TABLE))))
        finally:
            if engine is not None:
                engine.dispose()
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    accepted, bare_accepted = ours.pop("_accepted"), bare.pop("_accepted")
    ours.update(rows_in_erasure_requests=len(stored), accepted_ids_total=len(accepted), lost=len(accepted - stored))
    bare.update(rows_in_table=len(bare_stored), accepted_ids_total=len(bare_accepted),
                lost=len(bare_accepted - bare_stored))
    ratio = ours["requests_per_s"] / bare["requests_per_s"] if bare["requests_per_s"] else 0.0
    print(json.dumps({
        "benchmark": "intake",
        "backend": "postgresql",
        "endpoint": f"POST {PATH}",
        "baseline": f"POST {BARE_PATH}: a bare FastAPI endpoint doing one INSERT (benchmarks/bare_intake_app.py)",
        "server": f"uvicorn on 127.0.0.1 (loopback), {args.workers} worker process(es), the same for both; "
                  f"measured in {args.rounds} alternating windows each",
        "uvicorn_workers": args.workers,
        "clients": args.clients,
        "cpu_count": os.cpu_count(),
        "warmup_requests_per_window": WARMUP_PER_CLIENT * args.clients,
        "rounds": args.rounds,
        "ours": ours,
        "bare_insert": bare,
        "ratio_requests_per_s_ours_to_bare": round(ratio, 3),
        "ratio_p99_ours_to_bare": round(ours["p99_ms"] / bare["p99_ms"], 3) if bare["p99_ms"] else None,
        "goal_ratio_to_bare": GOAL_RATIO_TO_BARE,
        "goal_requests_per_s": GOAL_RPS,
        "goal_p99_ms": GOAL_P99_MS,
        "goal_lost": 0,
        "ratio_requests_per_s_to_goal": round(ours["requests_per_s"] / GOAL_RPS, 3),
        "goals_met": bool(ratio >= GOAL_RATIO_TO_BARE and ours["lost"] == 0 and not ours["errors"]),
    }, indent=2))


if __name__ == "__main__":
    main()

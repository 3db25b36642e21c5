"""A burst of submissions against a real ``erasure serve`` on PostgreSQL: many
concurrent clients, half of them sending every submission twice at once with the
same Idempotency-Key (a retry racing the original). Nothing is lost, nothing is
duplicated, and every request has its deadline, its timeline line and its audit
event on an intact chain. The suite runs 500 submissions from 20 clients; the
10,000 / 100 run is marked ``reliability`` and prints its time and p99:

    python -m pytest -m reliability tests/e2e/test_intake_burst.py -s
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from db.audit import AuditEvent, verify_chain
from db.requests import ErasureRequest, RequestEvent, issue_token
from db.session import make_engine, unit_of_work, upgrade_to_head
from pipeline.lifecycle import due_date
from tests.e2e.test_api import BASE, cli_env
from tests.prefect_server import api_server

pytestmark = pytest.mark.postgres


def _burst(base: str, token: str, submissions: int, clients: int) -> dict:
    """Submission i goes out from client i % clients; odd clients send it twice at once."""
    latencies: list[float] = []
    answers: dict[str, set[str]] = {}  # idempotency key -> ids answered
    failures: Counter = Counter()
    lock = threading.Lock()

    def client(n: int) -> None:
        retrying = n % 2 == 1
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as first, \
                httpx.Client(base_url=base, headers=headers, timeout=60) as second, \
                ThreadPoolExecutor(max_workers=2) as pair:
            for i in range(n, submissions, clients):
                key = f"burst-{i}"
                body = {"identifiers": [{"kind": "user_id", "value": f"user-{i}"}], "samples": [f"burst sample {i}"]}

                def post(http: httpx.Client) -> tuple[float, httpx.Response | Exception]:
                    started = time.perf_counter()
                    try:
                        response = http.post(BASE, json=body, headers={"Idempotency-Key": key})
                    except httpx.HTTPError as exc:
                        return time.perf_counter() - started, exc
                    return time.perf_counter() - started, response

                results = list(pair.map(post, (first, second))) if retrying else [post(first)]
                with lock:
                    for elapsed, outcome in results:
                        latencies.append(elapsed * 1000)
                        if isinstance(outcome, Exception):
                            failures[type(outcome).__name__] += 1
                        elif outcome.status_code != 202:
                            failures[str(outcome.status_code)] += 1
                        else:
                            answers.setdefault(key, set()).add(outcome.json()["id"])

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {"seconds": time.perf_counter() - started, "answers": answers, "failures": dict(failures),
            "http_requests": len(latencies), "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def _burst_on_a_real_server(tmp_path: Path, postgres_url: str, submissions: int, clients: int) -> dict:
    upgrade_to_head(postgres_url)
    engine = make_engine(postgres_url)
    try:
        with unit_of_work(engine) as session:
            token, _ = issue_token(session, "burst", ["intake"])
        with api_server(cli_env(tmp_path / "home", postgres_url), tmp_path / "api.log", workers=2) as base:
            report = _burst(base, token, submissions, clients)
        assert not report["failures"], (report["failures"], (tmp_path / "api.log").read_text()[-3000:])

        answers = report["answers"]
        assert len(answers) == submissions  # every submission answered 202
        assert all(len(ids) == 1 for ids in answers.values()), "a retry got another request than the original"
        answered = {next(iter(ids)) for ids in answers.values()}
        with unit_of_work(engine) as session:
            rows = session.execute(select(ErasureRequest.id, ErasureRequest.idempotency_key,
                                          ErasureRequest.received_at, ErasureRequest.due_at)).all()
            timeline = Counter(session.scalars(select(RequestEvent.request_id).where(RequestEvent.action == "submitted")))
            audited = Counter(session.scalars(select(AuditEvent.request_id).where(AuditEvent.kind == "request.submitted")))
            chain = verify_chain(session)
            total_events = session.scalar(select(func.count()).select_from(AuditEvent))
        stored = {row.id for row in rows}
        assert len(rows) == submissions and stored == answered  # 0 lost, 0 duplicated
        assert {row.idempotency_key for row in rows} == set(answers)
        assert all(row.due_at == due_date(row.received_at) for row in rows)  # each has its Art. 12(3) deadline
        assert timeline == Counter(stored) and audited == Counter(stored)  # exactly one of each per request
        assert chain.ok and chain.events == total_events, chain
        return report
    finally:
        engine.dispose()


def test_a_burst_of_submissions_with_racing_retries_loses_and_duplicates_nothing(tmp_path: Path,
                                                                                 postgres_url: str) -> None:
    _burst_on_a_real_server(tmp_path, postgres_url, submissions=500, clients=20)


@pytest.mark.reliability
def test_ten_thousand_submissions_from_a_hundred_clients(tmp_path: Path, postgres_url: str) -> None:
    report = _burst_on_a_real_server(tmp_path, postgres_url, submissions=10_000, clients=100)
    print(json.dumps({"submissions": 10_000, "clients": 100, "retrying_clients": 50,
                      "http_requests": report["http_requests"], "seconds": round(report["seconds"], 1),
                      "submissions_per_s": round(10_000 / report["seconds"], 1),
                      "p50_ms": round(report["p50_ms"], 1), "p99_ms": round(report["p99_ms"], 1),
                      "lost": 0, "duplicated": 0}))

"""The pipeline on three hosts: A serves, B locates, C retrains; C dies mid-retrain.

Hosts are network namespaces on this machine (tests/netns_hosts.py): A (the root
namespace, on a bridge address) runs PostgreSQL, the Prefect server, an
S3-compatible server and the API; B runs a worker of the ``cpu`` pool and C one of
the ``gpu`` pool (CPU here). B and C start with empty scratch folders as their data
homes and cannot see A's files (covered by tmpfs in their mount namespaces); all
they get is the database URL, the storage URL with its credentials, the Prefect API
URL and ``ERASURE_SECRET_KEY``, by environment (and B, the certifying host, its
signing key file, provisioned into its scratch folder as an operator would).

The S3-compatible server is moto's (``moto[server]`` from PyPI): pure Python, so it
installs with pip like the rest of the test dependencies and downloads nothing at
run time, and it implements the S3 REST API (multipart uploads included) that
s3fs/botocore speak to MinIO or AWS. MinIO itself is a Go binary not on PyPI; it is
what infra/compose.yaml runs.

Two datasets are ingested from the same file (``d1`` and ``d2``): SISA training is
deterministic and a sub-model's seed depends on its shard number, not the dataset,
so both train to the same checkpoints. Request 1 erases a person from ``d1``
undisturbed; request 2 erases the same person from ``d2`` while host C is killed
(SIGKILL of every process in its namespace: worker and flow run) in the middle of
the retraining. Its flow run is marked Crashed when its heartbeats stop
(flows/lost_runs.py), the cpu-side flow starts the retraining again, C's restarted
worker resumes it, and both ensembles end with the same checkpoint sha256s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import TEST_SECRET
from tests.netns_hosts import Host, Network, netns_unavailable_reason
from tests.prefect_server import IDENTIFIER_FIELDS, demo_subject, free_port
from tests.private_postgres import private_postgres

ROOT = Path(__file__).resolve().parents[2]
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "multihost", "AWS_SECRET_ACCESS_KEY": "multihost-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
HEARTBEAT_S = 30  # Prefect's minimum
LOST_AFTER_S = 75  # > 2 heartbeats without one: the run's host is gone
REQUEST_TIMEOUT_S = 420

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.postgres]



def _wait(what: str, ready, timeout_s: float, logs: list[Path] = (), poll_s: float = 0.5):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}" for log in logs
                              if log.exists())
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{tails}")
        time.sleep(poll_s)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _base_env(scratch: Path) -> dict[str, str]:
    """A host's environment before the pipeline's settings: nothing of this test session's."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    env.update(HOME=str(scratch), PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1",
               PREFECT_HOME=str(scratch / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="INFO")
    return env


@pytest.fixture
def cluster(tmp_path: Path):  # noqa: ANN201
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    run = uuid.uuid4().hex[:8]
    a_dir, b_dir, c_dir = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (a_dir, b_dir, c_dir):
        folder.mkdir()
    net = Network()
    try:
        b = net.add_host("B", hidden=(a_dir, c_dir))
        c = net.add_host("C", hidden=(a_dir, b_dir))
        subnet = f"{net.a.address.rsplit('.', 1)[0]}.0/24"
        with private_postgres(host=net.a.address, trusted_network=subnet) as pg:
            logs = tmp_path / "logs"
            logs.mkdir()
            # the S3-compatible server on A
            s3_port = free_port()
            s3_env = {**_base_env(a_dir), **S3_CREDENTIALS}
            net.a.start([sys.executable, "-m", "moto.server", "-H", net.a.address, "-p", str(s3_port)], s3_env,
                        logs / "s3.log", ROOT)
            endpoint = f"http://{net.a.address}:{s3_port}"
            _wait("the S3 server", lambda: _answers(f"{endpoint}/moto-api/"), 60, [logs / "s3.log"])
            bucket = f"erasure-{run}"
            import boto3

            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                         region_name="us-east-1").create_bucket(Bucket=bucket)
            # the Prefect server on A
            prefect_port = free_port()
            prefect_env = {**_base_env(a_dir), "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                           "PREFECT_LOGGING_LEVEL": "WARNING"}
            net.a.start([sys.executable, "-m", "prefect", "server", "start", "--host", net.a.address, "--port",
                         str(prefect_port)], prefect_env, logs / "prefect-server.log", ROOT)
            prefect_api = f"http://{net.a.address}:{prefect_port}/api"
            _wait("the Prefect server", lambda: _answers(f"{prefect_api}/health"), 180,
                  [logs / "prefect-server.log"])

            shared = {
                "ERASURE_DATABASE_URL": pg.url,
                "ERASURE_SECRET_KEY": TEST_SECRET,
                "ERASURE_STORAGE_URL": f"s3://{bucket}/erasure",
                "ERASURE_S3_ENDPOINT_URL": endpoint,
                **S3_CREDENTIALS,
                "PREFECT_API_URL": prefect_api,
                "ERASURE_CODE_DIR": str(ROOT),  # the code is installed on every host; data is not
                "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            }

            def host_env(folder: Path) -> dict[str, str]:
                (folder / "home").mkdir(exist_ok=True)
                return {**_base_env(folder), **shared, "ERASURE_HOME": str(folder / "home")}

            envs = {"A": host_env(a_dir), "B": host_env(b_dir), "C": host_env(c_dir)}
            # B certifies: its signing key is provisioned into its scratch folder (a secret: never in the store)
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            key_file = b_dir / "signing_key.pem"
            key_file.write_bytes(Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            key_file.chmod(0o600)
            envs["B"]["ERASURE_SIGNING_KEY_FILE"] = str(key_file)
            envs["B"]["ERASURE_RETRAIN_DEPLOYMENT"] = "retrain-shard/gpu"

            # A: schema, pools, deployments, the lost-run automation, an admin token, the API
            _ok(net.a.run([sys.executable, "-m", "api.cli", "db", "upgrade"], envs["A"], ROOT))
            code = ("import flows.prefect_setup\n"
                    "from prefect import get_client\n"
                    "from prefect.client.schemas.actions import WorkPoolCreate\n"
                    "from prefect.workers.process import ProcessWorker\n"
                    "with get_client(sync_client=True) as client:\n"
                    "    for pool in ('cpu', 'gpu'):\n"
                    "        client.create_work_pool(WorkPoolCreate(name=pool, type='process',\n"
                    "            base_job_template=ProcessWorker.get_default_base_job_template()))\n"
                    "from flows.lost_runs import ensure_lost_run_automation\n"
                    f"ensure_lost_run_automation({LOST_AFTER_S})\n")
            _ok(net.a.run([sys.executable, "-c", code], envs["A"], ROOT))
            _ok(net.a.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                           str(ROOT / "infra" / "prefect.yaml")], envs["A"], ROOT))
            token = json.loads(_ok(net.a.run([sys.executable, "-m", "api.cli", "token", "create", "--name",
                                              "multihost", "--scope", "admin", "--json"], envs["A"], ROOT)))["token"]
            api_port = free_port()
            net.a.start([sys.executable, "-m", "api.cli_requests", "serve", "--host", net.a.address, "--port",
                         str(api_port), "--log-level", "warning"], envs["A"], logs / "api.log", ROOT)
            api = f"http://{net.a.address}:{api_port}"
            _wait("the API", lambda: _answers(f"{api}/openapi.json"), 90, [logs / "api.log"])

            def start_worker(host: Host, pool: str) -> None:
                host.start([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                            "--name", f"{host.hostname}-{pool}-{uuid.uuid4().hex[:4]}"], envs[host.name],
                           logs / f"worker-{host.name}.log", ROOT)

            start_worker(b, "cpu")
            start_worker(c, "gpu")
            yield {"net": net, "b": b, "c": c, "pg": pg, "envs": envs, "api": api, "token": token,
                   "prefect_api": prefect_api, "logs": logs, "base": tmp_path, "start_worker": start_worker,
                   "bucket": bucket, "endpoint": endpoint}
            for host in (b, c, net.a):  # workers first, then the API, Prefect and S3 servers, then PostgreSQL
                host.stop()
    finally:
        net.close()


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args[-8:]}: {done.stderr[-3000:]}{done.stdout[-1000:]}"
    return done.stdout


def _submit(cluster: dict, email: str, dataset: str, key: str) -> str:
    answer = httpx.post(f"{cluster['api']}/v1/erasure-requests",
                        json={"identifiers": [{"kind": "email", "value": email}], "samples": [],
                              "datasets": [dataset]},
                        headers={"Authorization": f"Bearer {cluster['token']}", "Idempotency-Key": key}, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def _state(cluster: dict, request_id: str) -> str:
    answer = httpx.get(f"{cluster['api']}/v1/erasure-requests/{request_id}",
                       headers={"Authorization": f"Bearer {cluster['token']}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["state"]


def _wait_for(cluster: dict, request_id: str, states: set[str]) -> str:
    logs = sorted(cluster["logs"].glob("worker-*.log"))
    return _wait(f"request {request_id} in {sorted(states)}",
                 lambda: (s := _state(cluster, request_id)) in states and s, REQUEST_TIMEOUT_S, logs, poll_s=1)


def _review_erasing_everything(cluster: dict, request_id: str) -> None:
    """A reviewer (over HTTP) erases every borderline match once the run stopped for review;
    the API then starts the run that carries the request on."""
    if _wait_for(cluster, request_id, {"awaiting_review", "erasing", "awaiting_retrain", "retraining", "verifying",
                                       "completed", "failed"}) != "awaiting_review":
        return
    refs = [ref for (ref,) in _sql(cluster, "SELECT match_ref FROM request_matches WHERE request_id = %s "
                                            "AND decision = 'review' AND final_decision IS NULL", request_id)]
    assert refs
    answer = httpx.post(f"{cluster['api']}/v1/erasure-requests/{request_id}/review-decisions",
                        json={"decisions": [{"match_ref": ref, "decision": "erase"} for ref in refs]},
                        headers={"Authorization": f"Bearer {cluster['token']}"}, timeout=30)
    assert answer.status_code == 200, answer.text


def _wait_completed(cluster: dict, request_id: str) -> None:
    state = _wait_for(cluster, request_id, {"completed", "failed"})
    logs = sorted(cluster["logs"].glob("worker-*.log"))
    assert state == "completed", "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)


def _sql(cluster: dict, query: str, *args: object) -> list[tuple]:
    admin = cluster["pg"].url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
        return connection.execute(query, args).fetchall()


def _members(cluster: dict, dataset: str) -> list[tuple[int, str, str]]:
    """(shard, checkpoint key, checkpoint file sha256) of the dataset's ensemble in service."""
    return sorted(_sql(cluster, """
        SELECT m.shard, m.checkpoint_key, c.sha256 FROM ensemble_members m
        JOIN ensemble_versions v ON v.id = m.ensemble_id
        JOIN checkpoints c ON c.dataset_id = v.dataset_id AND c.key = m.checkpoint_key
        WHERE m.ensemble_id = (SELECT max(v2.id) FROM ensemble_versions v2 JOIN datasets d ON d.id = v2.dataset_id
                               WHERE d.name = %s)""", dataset))


def _s3_client(cluster: dict):  # noqa: ANN202
    import boto3

    return boto3.client("s3", endpoint_url=cluster["endpoint"], region_name="us-east-1",
                        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def _weights(cluster: dict, dataset: str) -> list[tuple[int, str, str]]:
    """(shard, checkpoint key, sha256 of the model weights) of the dataset's ensemble in service,
    read from the store with boto3. The checkpoint file's own sha256 covers its wall-clock cost
    figures too, so two runs that trained the same weights store files of different sha256s;
    the weights (every tensor of the model state, in name order) are what must be equal."""
    import hashlib
    import io

    import torch

    found = []
    for shard, key, _ in _members(cluster, dataset):
        ((path,),) = _sql(cluster, "SELECT c.path FROM checkpoints c JOIN datasets d ON d.id = c.dataset_id "
                                   "WHERE d.name = %s AND c.key = %s", dataset, key)
        bucket, _, object_key = path.removeprefix("s3://").partition("/")
        data = _s3_client(cluster).get_object(Bucket=bucket, Key=object_key)["Body"].read()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["model_state"]
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode() + b"\0" + state[name].contiguous().numpy().tobytes())
        found.append((shard, key, digest.hexdigest()))
    return found


def _bucket_objects(cluster: dict) -> list[str]:
    """Every object in the test's bucket, listed with boto3 (independently of our code)."""
    client = _s3_client(cluster)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=cluster["bucket"]):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _flow_runs(cluster: dict, flow_name: str) -> list[dict]:
    flow = httpx.get(f"{cluster['prefect_api']}/flows/name/{flow_name}", timeout=10).json()
    return httpx.post(f"{cluster['prefect_api']}/flow_runs/filter",
                      json={"flows": {"id": {"any_": [flow["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"},
                      timeout=10).json()


POOL_HOSTS = {"cpu": "host-b", "gpu": "host-c"}  # the only worker of each pool


def _run_host(run: dict) -> str:
    """The host that ran a flow run: its work pool's only worker's."""
    return POOL_HOSTS[run["work_pool_name"]]


def test_a_request_is_located_on_b_retrained_on_c_and_survives_c_dying(cluster: dict) -> None:
    envs, a = cluster["envs"], cluster["net"].a
    from shards.demo_data import write_demo

    files = write_demo(cluster["base"] / "a" / "demo-data", 600, seed=0)
    for dataset in ("d1", "d2"):
        _ok(a.run([sys.executable, "-m", "api.cli", "ingest", str(files.records), "--dataset", dataset,
                   "--shards", "3", "--slices", "3",
                   *[f"--identifier-field={field}:{kind}" for field, kind in IDENTIFIER_FIELDS], "--json"],
                  envs["A"], ROOT))
        # trained on the gpu pool: host C
        _ok(a.run([sys.executable, "-m", "prefect", "deployment", "run", "train-ensemble/train",
                   "-p", f"dataset={dataset}", "-p", "epochs=3", "-p", "budget=per-shard", "--watch"],
                  envs["A"], ROOT, timeout=600))
    assert _weights(cluster, "d1") == _weights(cluster, "d2") and len(_members(cluster, "d1")) == 3
    assert {_run_host(r) for r in _flow_runs(cluster, "train-ensemble")} == {"host-c"}
    trained = {shard: (key, sha) for shard, key, sha in _members(cluster, "d1")}

    # 1. undisturbed: submitted over HTTP to A, located on B, retrained on C
    subject = demo_subject(files.ground_truth)
    first = _submit(cluster, subject["email"], "d1", "multihost-1")
    _review_erasing_everything(cluster, first)
    _wait_completed(cluster, first)
    assert {_run_host(r) for r in _flow_runs(cluster, "process-erasure-request")} == {"host-b"}
    retrains = _flow_runs(cluster, "retrain-shard")
    assert retrains and {_run_host(r) for r in retrains} == {"host-c"}
    reference = _weights(cluster, "d1")
    changed = {shard for shard, key, _ in _members(cluster, "d1") if trained[shard][0] != key}
    assert changed, "the erasure retrained no sub-model"
    # what C wrote, B and A read: objects in the store, named by their sha256
    objects = _bucket_objects(cluster)
    assert all(any(sha in name for name in objects) for _, _, sha in _members(cluster, "d1")), objects[:10]
    paths = _sql(cluster, "SELECT path FROM checkpoints")
    assert paths and all(path.startswith("s3://") for (path,) in paths), paths[:3]

    # the certificate, exported on B (the certifying host) and verified offline with its public key
    b = cluster["b"]
    certificate, public_key = cluster["base"] / "b" / "certificate.json", cluster["base"] / "b" / "public_key.pem"
    _ok(b.run([sys.executable, "-m", "api.cli", "audit", "certificate", first, "--out", str(certificate), "--json"],
              envs["B"], ROOT))
    _ok(b.run([sys.executable, "-m", "api.cli", "audit", "public-key", "--out", str(public_key), "--json"],
              envs["B"], ROOT))
    verdict = subprocess.run([sys.executable, "-m", "api.cli", "audit", "verify-certificate", str(certificate),
                              "--public-key", str(public_key), "--json"], env=envs["A"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert json.loads(verdict.stdout)["valid"] is True
    body = json.loads(certificate.read_text())["certificate"]
    (section,) = body["datasets"]
    # the device each sub-model retrained on is recorded (C's "gpu" pool is a CPU here)
    assert {job["device"] for job in section["retraining"]} == {"cpu"}

    # 2. host C dies in the middle of a retraining; the job is picked up again and ends the same
    c = cluster["c"]
    second = _submit(cluster, subject["email"], "d2", "multihost-2")
    _review_erasing_everything(cluster, second)
    _wait("the retraining of d2 claimed on C", lambda: _sql(cluster, """
        SELECT j.id FROM shard_retrain_jobs j JOIN datasets d ON d.id = j.dataset_id
        WHERE d.name = 'd2' AND j.status = 'running'"""), REQUEST_TIMEOUT_S,
          sorted(cluster["logs"].glob("worker-*.log")), poll_s=0.05)
    killed = c.kill_everything()
    assert killed, "nothing ran on host C"
    left = _sql(cluster, """SELECT j.status FROM shard_retrain_jobs j JOIN datasets d ON d.id = j.dataset_id
                            WHERE d.name = 'd2'""")
    assert ("running",) in left, f"the kill came after the retraining: {left}"
    assert _state(cluster, second) != "completed"
    cluster["start_worker"](c, "gpu")  # the host comes back (or a fresh one joins the pool)
    _wait_completed(cluster, second)
    crashed = [r for r in _flow_runs(cluster, "retrain-shard") if r["state_type"] == "CRASHED"]
    assert crashed, "the killed retraining was not marked crashed"
    assert _weights(cluster, "d2") == reference  # the same weights as the undisturbed run

"""infra/compose.yaml is valid and holds what an operator relies on: migrations once, an
authenticated Prefect server kept off the host, a gpu worker that really has CUDA torch, and
MinIO as the shared store (its bucket made at start-up, every service on the same storage URL,
no secret in it).

Images cannot be pulled here, so the file is checked, not run: by `docker compose config` where
Compose is installed, and always against the Compose Specification's JSON schema."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "compose.yaml"
UI_OVERLAY = ROOT / "infra" / "compose.prefect-ui.yaml"
SCHEMA = ROOT / "tests" / "resources" / "compose-spec" / "compose-spec.json"
ENV = {"ERASURE_SECRET_KEY": "0123456789abcdef" * 4, "PREFECT_AUTH": "admin:pw", "MINIO_ROOT_USER": "erasure",
       "MINIO_ROOT_PASSWORD": "minio-password", "ERASURE_SIGNING_KEY_PEM": "/secrets/signing_key.pem"}
_VAR = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""
    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise ValueError(f"required variable {name} is missing: {arg}")
        return arg if op == "-" else ""
    return _VAR.sub(one, text)


def load(path: Path, env: dict[str, str] = ENV) -> dict:
    return yaml.safe_load(interpolate(path.read_text(encoding="utf-8"), env))


def test_the_compose_file_is_valid_compose() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    for path in (COMPOSE, UI_OVERLAY):
        document = load(path)
        # the top-level project `name` joined the specification (2022) after this schema's version
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", document.pop("name", "erasure"))
        jsonschema.Draft201909Validator(schema).validate(document)
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                              text=True, env={**os.environ, **ENV})
        assert done.returncode == 0, done.stderr


def test_it_refuses_to_start_without_the_secret_key_or_the_prefect_credentials() -> None:
    for missing in ENV:
        with pytest.raises(ValueError, match=missing):
            load(COMPOSE, {k: v for k, v in ENV.items() if k != missing})


def test_migrations_run_once_before_every_service_that_uses_the_database() -> None:
    services = load(COMPOSE)["services"]
    upgrading = [name for name, s in services.items() if "db upgrade" in str(s.get("command", ""))]
    assert upgrading == ["migrate"]
    assert services["migrate"].get("restart") == "no"
    app_services = [name for name, s in services.items()
                    if "ERASURE_DATABASE_URL" in (s.get("environment") or {}) and name != "migrate"]
    assert set(app_services) >= {"api", "worker-cpu", "worker-gpu"}
    for name in app_services:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_the_prefect_server_requires_auth_and_is_not_published_unless_asked() -> None:
    services = load(COMPOSE)["services"]
    prefect = services["prefect"]
    assert "ports" not in prefect
    secret = prefect["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert secret == ENV["PREFECT_AUTH"]
    for name, s in services.items():
        env = s.get("environment") or {}
        if "PREFECT_API_URL" in env:  # every client of the server holds its credentials
            assert env.get("PREFECT_API_AUTH_STRING") == secret, name
    published = load(UI_OVERLAY)["services"]["prefect"]["ports"]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published)


def test_only_the_gpu_worker_asks_for_cuda_and_it_gets_a_cuda_build_of_torch() -> None:
    services = load(COMPOSE)["services"]
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG TORCH_INDEX" in dockerfile and "${TORCH_INDEX}" in dockerfile
    for name, s in services.items():
        if "build" not in s:
            continue
        index = s["build"]["args"]["TORCH_INDEX"]
        wants_cuda = (s.get("environment") or {}).get("ERASURE_DEVICE", "").startswith("cuda")
        if name == "worker-gpu":
            assert wants_cuda and re.search(r"/whl/cu\d+$", index), index
            assert s.get("runtime") == "nvidia"
            assert s["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        else:
            assert not wants_cuda and index.endswith("/whl/cpu"), name


def _app_services(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if "ERASURE_DATABASE_URL" in (s.get("environment") or {})}


def test_minio_is_the_shared_store_and_its_bucket_is_made_before_any_app_service_starts() -> None:
    services = load(COMPOSE)["services"]
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio") and "server /data" in minio["command"]
    assert "ports" not in minio  # only the compose network reaches the store
    assert minio["healthcheck"]["test"]
    init = services["minio-init"]
    assert init["restart"] == "no"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    urls = {s["environment"]["ERASURE_STORAGE_URL"] for s in _app_services(services).values()}
    (url,) = urls  # every service reads and writes the same store
    bucket = re.fullmatch(r"s3://([a-z0-9.-]+)/[\w/-]+", url).group(1)
    assert re.search(rf"mc mb --ignore-existing \w+/{bucket}(\s|$)", script), script
    for name, s in _app_services(services).items():
        env = s["environment"]
        assert env["ERASURE_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"] == ENV["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == ENV["MINIO_ROOT_PASSWORD"], name
        if name != "migrate":  # the schema needs no store
            assert s["depends_on"]["minio-init"]["condition"] == "service_completed_successfully", name
    assert set(_app_services(services)) >= {"migrate", "api", "worker-cpu", "worker-gpu"}


def test_secrets_stay_out_of_the_store_and_out_of_the_file() -> None:
    document = load(COMPOSE)
    services = document["services"]
    text = COMPOSE.read_text(encoding="utf-8")
    for name in ("ERASURE_SECRET_KEY", "MINIO_ROOT_PASSWORD", "PREFECT_AUTH"):  # from the shell, never literal
        assert re.search(rf"\$\{{{name}:\?", text), name
    # the signing key is a compose secret, mounted only where certificates are issued, never under
    # the data home or the store
    assert document["secrets"]["signing_key"]["file"] == ENV["ERASURE_SIGNING_KEY_PEM"]
    signers = {name for name, s in services.items() if "signing_key" in (s.get("secrets") or [])}
    assert signers == {"api", "worker-cpu"}
    for name, s in _app_services(services).items():
        env = s["environment"]
        key_file = env.get("ERASURE_SIGNING_KEY_FILE")
        if name in signers:
            assert key_file == "/run/secrets/signing_key", name
        else:
            assert key_file is None, name
        home, store = env["ERASURE_HOME"], env["ERASURE_STORAGE_URL"]
        assert not store.startswith(("file:", "/")) and not store.startswith(home), name
        holding_the_key = [k for k, v in env.items() if ENV["ERASURE_SECRET_KEY"] in str(v)]
        assert holding_the_key == ["ERASURE_SECRET_KEY"], name


def test_retraining_goes_to_the_gpu_pool_and_lost_runs_are_noticed() -> None:
    services = load(COMPOSE)["services"]
    assert services["worker-cpu"]["environment"]["ERASURE_RETRAIN_DEPLOYMENT"] == "retrain-shard/gpu"
    for name in ("worker-cpu", "worker-gpu"):  # heartbeats: flows/lost_runs.py marks a dead host's run Crashed
        assert int(services[name]["environment"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30, name

"""infra/compose.yaml is valid and holds what an operator relies on: migrations once, an
authenticated Prefect server kept off the host, and a gpu worker that really has CUDA torch.

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
ENV = {"ERASURE_SECRET_KEY": "0" * 64, "PREFECT_AUTH": "admin:pw"}
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

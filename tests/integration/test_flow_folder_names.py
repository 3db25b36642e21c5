"""Prefect adds a flow file's folder to sys.path when it loads an entrypoint:
no module in flows/ may shadow an installed top-level package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

FLOWS = Path(__file__).resolve().parents[2] / "flows"


def test_no_flow_module_shadows_an_installed_package() -> None:
    installed = {name.replace("-", "_").lower() for name in importlib.metadata.packages_distributions()}
    ours = {p.stem.lower() for p in FLOWS.glob("*.py")} - {"__init__"}
    assert "requests" in installed  # the check can fail: the clash that once broke `import docker`
    assert ours & installed == set()

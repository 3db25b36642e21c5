"""The layering of DESIGN.md, checked on every module's imports (also the lazy ones
inside functions): the pure core imports nothing of ours but itself, the service
layer never imports Prefect or the orchestration, and nothing below the entry
points imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"api", "db", "dedup", "flows", "pipeline", "shards", "migrations"}
# package -> what of ours (and which third-party roots) it may not import
FORBIDDEN = {
    "shards": OURS - {"shards"} | {"prefect", "fastapi", "sqlalchemy"},
    "dedup": OURS - {"dedup"} | {"prefect", "fastapi", "sqlalchemy"},
    "db": OURS - {"db"} | {"prefect", "fastapi"},
    "pipeline": {"flows", "api", "prefect", "fastapi"},
    "flows": {"api", "fastapi"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_the_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offending = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert {f: bad for f, bad in offending.items() if bad} == {}


def test_flows_hold_only_prefect_orchestration() -> None:
    """Every module in flows/ (but the defaults it sets before Prefect loads) uses Prefect."""
    plain = [f.name for f in (ROOT / "flows").glob("*.py")
             if f.name not in {"__init__.py", "prefect_setup.py"} and "prefect" not in imported_roots(f)]
    assert plain == []

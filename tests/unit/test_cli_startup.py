"""`erasure --help` starts without the heavy libraries (torch, Prefect, FAISS, FastAPI, pyarrow):
they are imported inside the commands that use them, so the CLI's start-up stays fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "prefect", "faiss", "fastapi", "pyarrow")


def test_cli_help_imports_no_heavy_library() -> None:
    code = (
        "import json, runpy, sys\n"
        "sys.argv = ['erasure', '--help']\n"
        "try:\n"
        "    runpy.run_module('api.cli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_retrain_estimate_imports_no_torch() -> None:
    code = ("import sys, pipeline.placement, shards.schedule\n"
            "print('torch' in sys.modules)\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    assert out.stdout.strip() == "False"


FAST_COMMANDS = [
    ["request", "show", "5b7a3c52-2f1c-4c56-9d6b-0b7f3f0e1a11"],  # not found: exits 2 after its imports
    ["audit", "timeline", "5b7a3c52-2f1c-4c56-9d6b-0b7f3f0e1a11"],
    ["audit", "due"],
    ["audit", "verify-log"],
    ["token", "list"],
]


@pytest.mark.parametrize("command", FAST_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_reading_commands_import_no_heavy_library(command: list[str], tmp_path: Path) -> None:
    """What a person types to look at a request or the audit trail loads neither the model nor
    the indexes nor Prefect (nor numpy): their start-up is Python, typer, SQLAlchemy, Alembic."""
    heavy = (*HEAVY, "numpy")
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = ['erasure', *{command!r}, '--home', {str(tmp_path / 'home')!r}]\n"
        "try:\n"
        "    runpy.run_module('api.cli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERASURE_")}
    env["PYTHONPATH"] = str(root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

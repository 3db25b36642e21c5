"""`erasure --help` starts without the heavy libraries (torch, Prefect, FAISS, FastAPI, pyarrow):
they are imported inside the commands that use them, so the CLI's start-up stays fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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

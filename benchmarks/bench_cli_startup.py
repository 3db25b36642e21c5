"""Start-up of the `erasure` commands a person types to look at things (goal: <= 1 s of overhead).

For each command: the wall and CPU seconds of the whole command (median of --repeat runs),
which heavy libraries it imported, and, for `import api.cli`, the import time that
`python -X importtime` reports. The commands run on a demo home that is ingested and
trained (so that `erasure locate` meets a trained dataset: its retrain estimate must not
load torch). The interpreter's own start (`python -c pass`) is reported apart: it is not
the CLI's overhead. On a shared machine read the CPU seconds; wall time carries the load.

    .venv/bin/python benchmarks/bench_cli_startup.py                     # builds a demo home (~1-2 min)
    .venv/bin/python benchmarks/bench_cli_startup.py --home /path/home   # a home with a trained 'demo'

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 1.0
HEAVY = ("torch", "prefect", "faiss", "fastapi", "pyarrow", "numpy")
PROBE = ("import atexit, json, runpy, sys\n"
         "atexit.register(lambda: print('HEAVY=' + json.dumps([m for m in {heavy!r} if m in sys.modules]), "
         "file=sys.stderr))\n"
         "sys.argv = ['erasure', *{args!r}]\n"
         "runpy.run_module('api.cli', run_name='__main__')\n")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    cpu, started = children_cpu_s(), time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - started, children_cpu_s() - cpu, done


def measure(args: list[str], env: dict[str, str], repeat: int) -> dict:
    walls, cpus, heavy, status = [], [], None, None
    for _ in range(repeat):
        wall, cpu, done = timed([sys.executable, "-c", PROBE.format(heavy=HEAVY, args=args)], env)
        walls.append(wall)
        cpus.append(cpu)
        found = re.search(r"HEAVY=(\[.*\])", done.stderr)
        heavy, status = (json.loads(found.group(1)) if found else None), done.returncode
    return {"wall_s": round(statistics.median(walls), 3), "cpu_s": round(statistics.median(cpus), 3),
            "exit_status": status, "heavy_imports": heavy}


def import_time_s(env: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import api.cli"], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
    last = [line for line in done.stderr.splitlines() if line.rstrip().endswith("| api.cli")][-1]
    return int(last.split("|")[1]) / 1e6


def build_home(home: Path, env: dict[str, str]) -> None:
    def erasure(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "api.cli", *args, "--json"], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"erasure {' '.join(args)}: {done.stderr[-2000:]}")
        return json.loads(done.stdout)

    demo = erasure("demo-data", str(home / "demo-data"), "--records", "1000")
    erasure("ingest", demo["records"], "--dataset", "demo", "--identifier-field=email", "--identifier-field=user_id",
            "--identifier-field=name")
    erasure("train", "--dataset", "demo", "--epochs", "1", "--budget", "per-shard")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="a home with a trained dataset 'demo'")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ERASURE_"))}
    env["PYTHONPATH"] = str(ROOT)
    home = args.home
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="bench-cli-")) / "home"
        env["ERASURE_HOME"] = str(home)
        build_home(home, env)
    env["ERASURE_HOME"] = str(home.resolve())

    submitted = subprocess.run([sys.executable, "-m", "api.cli", "request", "submit", "-i", "email=nobody@example.org",
                                "--json"], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    request_id = json.loads(submitted.stdout)["id"]
    commands = {
        "--help": ["--help"],
        "request show": ["request", "show", request_id],
        "audit timeline": ["audit", "timeline", request_id],
        "audit due": ["audit", "due"],
        "audit verify-log": ["audit", "verify-log"],
        "locate": ["locate", "--dataset", "demo", "-i", "email=nobody@example.org"],
    }
    bare = [timed([sys.executable, "-c", "pass"], env)[:2] for _ in range(args.repeat)]
    figures: dict = {
        "goal_overhead_s": GOAL_S,
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python_bare_start": {"wall_s": round(statistics.median(w for w, _ in bare), 3),
                              "cpu_s": round(statistics.median(c for _, c in bare), 3)},
        "import_api_cli_s": round(statistics.median(import_time_s(env) for _ in range(args.repeat)), 3),
        "commands": {name: measure(argv_, env, args.repeat) for name, argv_ in commands.items()},
    }
    for row in figures["commands"].values():
        row["overhead_cpu_s"] = round(row["cpu_s"] - figures["python_bare_start"]["cpu_s"], 3)
        row["within_goal_by_cpu"] = row["overhead_cpu_s"] <= GOAL_S
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

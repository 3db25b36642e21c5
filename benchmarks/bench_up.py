"""Seconds of `erasure request process` for a one-record erasure, without and with `erasure up`.

Everything runs as a user types it (CLI subprocesses, a shell without PREFECT_*):
demo data, `erasure ingest`, `erasure train`, then two one-record subjects' requests
(`erasure request submit`). The first is processed with no server running (the
command starts a temporary Prefect server), the second while `erasure up` runs for
the same home (the command uses its server). Also reports how long `erasure up`
takes until it prints its URLs, on a fresh home and on a second start. The
baseline is issue 12's figure: 33 s for `erasure request process` without a server.

    .venv/bin/python benchmarks/bench_up.py --records 2000

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_PROCESS_S = 33.0  # issue 12: one-record erasure, temporary Prefect server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CPU_SECONDS: dict[str, float] = {}  # per command, CPU seconds of it and of what it waited for (a shared machine's
# wall time depends on the other load; its CPU time much less)


def erasure(env: dict[str, str], *args: str) -> tuple[dict, float]:
    started, cpu = time.perf_counter(), children_cpu_s()
    done = subprocess.run([sys.executable, "-m", "api.cli", *args, "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    CPU_SECONDS[" ".join(args[:2])] = round(children_cpu_s() - cpu, 2)
    if done.returncode != 0:
        raise SystemExit(f"erasure {' '.join(args)} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout), round(seconds, 2)


class Up:
    """`erasure up` in a subprocess; ``ready_s`` is the time until it printed its URLs."""

    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.out, self.err = home.parent / f"{home.name}-up.out", home.parent / f"{home.name}-up.err"  # not in the home
        started = time.perf_counter()
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "up", "--api-port", str(free_port()),
                 "--prefect-port", str(free_port())], env=env, cwd=ROOT, stdout=out, stderr=err,
                start_new_session=True)
        while "admin token" not in self.out.read_text():
            if self.process.poll() is not None:
                raise SystemExit(f"erasure up exited: {self.err.read_text()[-3000:]}")
            time.sleep(0.2)
        self.ready_s = round(time.perf_counter() - started, 2)

    def stop(self) -> float:
        started = time.perf_counter()
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=120)
        return round(time.perf_counter() - started, 2)


def one_record_subjects(ground_truth: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in ground_truth.read_text().splitlines()]
    persons = [r for r in rows if r["type"] == "person" and len(r["originals"]) == 1 and not r["copies"]]
    return [p["email"] for p in persons[:n]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--home", type=Path, default=None, help="data home (default: a temporary directory)")
    args = parser.parse_args(argv)
    home = (args.home or Path(tempfile.mkdtemp(prefix="bench-up-"))).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ERASURE_"))}
    env.update(ERASURE_HOME=str(home), PYTHONPATH=str(ROOT))

    figures: dict = {"records": args.records, "database": "sqlite (embedded)", "cpus": os.cpu_count()}
    demo, _ = erasure(env, "demo-data", str(home / "demo-data"), "--records", str(args.records))
    _, figures["ingest_s"] = erasure(env, "ingest", demo["records"], "--dataset", "demo",
                                     "--identifier-field=email", "--identifier-field=user_id",
                                     "--identifier-field=name")
    _, figures["train_without_up_s"] = erasure(env, "train", "--dataset", "demo", "--epochs", "2")
    first, second = one_record_subjects(Path(demo["ground_truth"]), 2)

    request, _ = erasure(env, "request", "submit", "-i", f"email={first}")
    result, figures["process_without_up_s"] = erasure(env, "request", "process", request["id"])
    figures["process_without_up_cpu_s"] = CPU_SECONDS["request process"]
    figures["without_up_state"] = result["state"]
    figures["without_up_erased"] = result["erased"]

    up = Up(env, home)
    figures["up_first_start_ready_s"] = up.ready_s
    try:
        # submitted just before processing: the sweep leaves a request received for less than its grace alone
        request, _ = erasure(env, "request", "submit", "-i", f"email={second}")
        result, figures["process_with_up_s"] = erasure(env, "request", "process", request["id"])
        figures["process_with_up_cpu_s"] = CPU_SECONDS["request process"]
        figures["with_up_state"] = result["state"]
        figures["with_up_erased"] = result["erased"]
    finally:
        figures["up_stop_s"] = up.stop()
    up = Up(env, home)
    figures["up_second_start_ready_s"] = up.ready_s
    up.stop()

    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    figures["baseline_process_s"] = BASELINE_PROCESS_S
    figures["with_up_vs_without"] = round(figures["process_with_up_s"] / figures["process_without_up_s"], 3)
    figures["with_up_vs_baseline"] = round(figures["process_with_up_s"] / BASELINE_PROCESS_S, 3)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

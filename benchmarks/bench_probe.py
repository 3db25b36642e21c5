"""The reference-calibrated membership probe, before and after an erasure, on whole demo runs.

Each run is the demo (``erasure demo``: generate, ingest, train, a request for
the demo person with the most planted copies, review decided from the ground
truth, erasure, retraining, probe, certificate) in a fresh data home. For each
it reports the probe's two readings (the ensemble before erasure and the
retrained one): the AUC of the erased records against records the probing
sub-models never saw, its cluster-bootstrap interval, the number of distinct
texts behind the erased records (the bootstrap's unit), the power (the same
test on records still in training against the same control) and the sentence
the certificate carries.

    .venv/bin/python benchmarks/bench_probe.py                                   # 1,000 and 10,000 records
    .venv/bin/python benchmarks/bench_probe.py --runs 1000:4 --runs 1000:40      # records:epochs

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run_spec(text: str) -> tuple[int, float]:
    records, _, epochs = text.partition(":")
    try:
        return int(records), float(epochs or 4.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a run is RECORDS[:EPOCHS], e.g. 10000:4; got {text!r}") from None


def _probe_figures(summary: dict) -> dict:
    power = summary.get("power") or {}
    return {"ensemble_version": summary["ensemble_version"], "auc": summary["auc"], "ci_low": summary["ci_low"],
            "ci_high": summary["ci_high"], "erased": summary["erased_count"], "distinct_texts": summary["groups"],
            "control": summary["heldout_count"], "control_groups": summary["heldout_groups"],
            "power": {"auc": power.get("auc"), "ci_low": power.get("ci_low"), "ci_high": power.get("ci_high"),
                      "members": power.get("members")},
            "erased_seen_by_scorer": summary["erased_seen_by_scorer"], "note": summary["note"],
            "reason": summary["reason"], "sentence": summary["sentence"]}


def run_once(base: Path, records: int, epochs: float, shards: int, slices: int, embedder: str) -> dict:
    from api.demo import run_full_demo
    from db.settings import Settings
    from pipeline.progress import SilentReporter

    home = base / f"n{records}-e{epochs:g}"
    settings = Settings(home=home, database_url=None,
                        secret_key=os.environ.get("ERASURE_SECRET_KEY") or "bench-secret-key-0123456789abcdef")
    started = time.perf_counter()
    result = run_full_demo(settings, records=records, shards=shards, slices=slices, reporter=SilentReporter(),
                           embedder=embedder, epochs=epochs)
    seconds = time.perf_counter() - started
    subject = result["subject"]
    probes = {p["role"]: _probe_figures(p) for p in result["accountability"]["membership_probe"]}
    return {
        "records": records, "shards": shards, "slices": slices, "epochs": epochs, "embedder": embedder,
        "state": result["state"],
        "subject": {"records": subject["originals"] + sum(subject["planted_copies"].values()),
                    "originals": subject["originals"], "planted_copies": subject["planted_copies"]},
        "erased": result["erased"], "missed": result["missed"],
        "probe": probes,
        "sentence": result["accountability"].get("membership_sentence"),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=_run_spec, action="append", default=None,
                        help="RECORDS[:EPOCHS], repeatable (default: 1000:4 and 10000:4)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--embedder", default="hashing", help="'hashing' (fast) or 'minilm' (the demo's default)")
    parser.add_argument("--home", type=Path, default=None, help="parent of the runs' data homes (default: temporary)")
    args = parser.parse_args(argv)

    base = args.home or Path(tempfile.mkdtemp(prefix="bench-probe-"))
    base.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(base / "prefect"))  # before Prefect is imported
    (base / "prefect").mkdir(parents=True, exist_ok=True)
    runs = [run_once(base, records, epochs, args.shards, args.slices, args.embedder)
            for records, epochs in (args.runs or [(1000, 4.0), (10000, 4.0)])]
    print(json.dumps({"benchmark": "membership probe (reference-calibrated)", "home": str(base), "runs": runs},
                     indent=2))
    return 0 if all(r["state"] == "completed" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

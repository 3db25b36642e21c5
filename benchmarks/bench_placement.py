"""Placement benchmark: what one person's erasure costs under record vs subject placement.

Generates the demo dataset (``shards.demo_data``), places it both ways (the same
functions ingest uses: ``shards.assign.place_record`` and
``shards.placement.place_subjects`` with near-copies from ``dedup.near_copies``),
and prices a request for every person with 3-40 records (their originals and
their copies at Jaccard >= 0.8, what locate erases) with
``shards.retrain.retrain_estimate``, the retrain planner's sums. Prints one JSON
document. No database, no training: placement and cost only.

    python benchmarks/bench_placement.py [--records 20000] [--shards 8] [--slices 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedup.identifiers import keyed_hash  # noqa: E402
from dedup.minhash import MinHashParams  # noqa: E402
from dedup.near_copies import near_copies_within  # noqa: E402
from shards.assign import place_record  # noqa: E402
from shards.demo_data import LABELS, read_ground_truth, write_demo  # noqa: E402
from shards.placement import BatchRecord, NearCopy, SubjectOptions, place_subjects, placement_skew  # noqa: E402
from shards.retrain import expected_retrain_fraction, retrain_estimate  # noqa: E402
from shards.training import SliceSchedule  # noqa: E402

KEY = b"bench-placement-key"


def label_distance(labels_by_shard: dict[int, Counter], n_labels: int) -> float:
    """The largest total-variation distance between a shard's label distribution and the whole data's."""
    total = Counter()
    for c in labels_by_shard.values():
        total.update(c)
    n = sum(total.values())
    worst = 0.0
    for c in labels_by_shard.values():
        m = sum(c.values())
        tv = 0.5 * sum(abs(c[y] / m - total[y] / n) for y in range(n_labels)) if m else 0.0
        worst = max(worst, tv)
    return worst


def run(n_records: int, n_shards: int, n_slices: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo(tmp, n_records, seed)
        records = [json.loads(line) for line in files.records.read_text(encoding="utf-8").splitlines()]
        truth = read_ground_truth(files.ground_truth)
    labels = {r["id"]: r["label"] for r in records}

    t = time.perf_counter()
    batch = [BatchRecord(r["id"], tuple((k, keyed_hash(KEY, k, r[k])) for k in ("email", "user_id", "name")
                                        if r.get(k))) for r in records]
    options = SubjectOptions()
    query = [i for i, b in enumerate(batch) if not any(k in options.linking_kinds for k, _ in b.identifiers)]
    pairs = near_copies_within([r["id"] for r in records], [r["text"] for r in records], query,
                               MinHashParams(), options.min_copy_jaccard)
    copies_s = time.perf_counter() - t
    t = time.perf_counter()
    subject = place_subjects(batch, n_shards, n_slices, seed,
                             near_copies=[NearCopy(p.copy_id, p.original_id, p.jaccard) for p in pairs],
                             options=options)
    subject_s = time.perf_counter() - t
    placements = {
        "record": {r["id"]: (p.shard, p.slice) for r in records
                   for p in [place_record(r["id"], seed, n_shards, n_slices)]},
        "subject": {rid: (p.shard, p.slice) for rid, p in subject.places.items()},
    }

    erased_copies: dict[int, list[str]] = {}
    for c in truth["copies"]:
        if c["jaccard"] >= options.min_copy_jaccard:
            erased_copies.setdefault(c["person"], []).append(c["id"])
    requests = [p["originals"] + erased_copies.get(p["person"], []) for p in truth["persons"]
                if 3 <= len(p["originals"]) <= 40]
    schedule = SliceSchedule.paper(n_slices, 1.0)
    out: dict = {}
    for mode, where in placements.items():
        counts = {s: [0] * n_slices for s in range(n_shards)}
        by_shard: dict[int, Counter] = {s: Counter() for s in range(n_shards)}
        for rid, (shard, slc) in where.items():
            counts[shard][slc] += 1
            by_shard[shard][labels[rid]] += 1
        fractions, touched, earliest = [], [], []
        for ids in requests:
            est = retrain_estimate(counts, [where[r] for r in ids], schedule)
            fractions.append(est.fraction)
            touched.append(len(est.shards))
            earliest += [s.earliest_slice for s in est.shards]
        sizes = [sum(v) for v in counts.values()]
        out[mode] = {
            "retrain_fraction_mean": round(statistics.fmean(fractions), 4),
            "retrain_fraction_median": round(statistics.median(fractions), 4),
            "retrain_fraction_p90": round(sorted(fractions)[int(0.9 * (len(fractions) - 1))], 4),
            "shards_touched_mean": round(statistics.fmean(touched), 3),
            "earliest_slice_histogram": dict(sorted(Counter(earliest).items())),
            "shard_size_max_over_mean": round(placement_skew(sizes), 4),
            "shard_sizes": sizes,
            "slice_sizes_total": [sum(counts[s][r] for s in counts) for r in range(n_slices)],
            "label_tv_distance_max": round(label_distance(by_shard, len(LABELS)), 4),
        }
    k_mean = statistics.fmean(len(ids) for ids in requests)
    return {
        "benchmark": "placement",
        "records": n_records, "shards": n_shards, "slices": n_slices, "seed": seed,
        "persons_requested": len(requests), "records_per_request_mean": round(k_mean, 2),
        "schedule": "paper (equal epochs per slice on cumulative data)",
        "record": out["record"],
        "subject": {**out["subject"], **subject.report(), "hubs": len(subject.hubs),
                    "near_copy_pairs": len(pairs)},
        "improvement_mean": round(out["record"]["retrain_fraction_mean"] / out["subject"]["retrain_fraction_mean"], 2),
        "predicted_record_fraction_for_mean_k": round(expected_retrain_fraction(n_shards, n_slices, round(k_mean)), 4),
        "paper_single_deletion_fraction": round((2 / 3 + 1 / (3 * n_slices)) / n_shards, 4),
        "seconds": {"near_copies": round(copies_s, 2), "place_subjects": round(subject_s, 2)},
        "goals": {"subject_mean_le_0.08": out["subject"]["retrain_fraction_mean"] <= 0.08,
                  "improvement_ge_6x": out["record"]["retrain_fraction_mean"]
                  >= 6 * out["subject"]["retrain_fraction_mean"],
                  "skew_le_1.1": out["subject"]["shard_size_max_over_mean"] <= 1.1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    result = run(args.records, args.shards, args.slices, args.seed)
    result["seconds"]["total"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
